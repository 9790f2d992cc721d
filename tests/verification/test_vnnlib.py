"""The strict VNN-LIB reader: the VNN-COMP subset, its normal form, and one located error for
everything outside it."""

from __future__ import annotations

import numpy as np
import pytest

from phalanx.errors import PhalanxError
from phalanx.verification.vnnlib import parse_vnnlib, vnn_number

DECL = "\n".join([f"(declare-const X_{i} Real)" for i in range(3)] + [f"(declare-const Y_{j} Real)" for j in range(3)])
BOX = "\n".join(f"(assert (>= X_{i} -0.5))\n(assert (<= X_{i} {0.25 * (i + 1)}))" for i in range(3))


def test_robustness_property_is_one_region_one_group() -> None:
    text = f"""; label 2
{DECL}
{BOX}
(assert (or
    (and (>= Y_0 Y_2))
    (and (>= Y_1 Y_2))
))
"""
    p = parse_vnnlib(text)
    assert (p.n_inputs, p.n_outputs, len(p.regions)) == (3, 3, 1)
    r = p.regions[0]
    np.testing.assert_array_equal(r.lower, [-0.5] * 3)
    np.testing.assert_array_equal(r.upper, [0.25, 0.5, 0.75])
    assert len(r.groups) == 1 and len(r.groups[0]) == 2
    # Y_0 >= Y_2 is (Y_0 - Y_2 >= 0)
    np.testing.assert_array_equal(r.groups[0][0].coef, [1.0, 0.0, -1.0])
    assert r.groups[0][0].const == 0.0
    assert p.holds([0, 0, 0], [1.0, 0.0, 1.0]) and p.holds([0, 0, 0], [0.0, 3.0, 2.0])
    assert not p.holds([0, 0, 0], [0.0, 1.0, 2.0])
    assert not p.holds([0.9, 0, 0], [1.0, 0.0, 1.0])  # outside the box


def test_constants_conjunctions_and_input_disjunctions() -> None:
    text = f"""{DECL}
(assert (<= X_0 1.0))
(assert (>= X_0 0))
(assert (<= X_1 1.5e-1))
(assert (>= X_1 -2))
(assert (or (and (>= X_2 0.0) (<= X_2 1.0)) (and (>= X_2 2.0) (<= X_2 3.0))))
(assert (<= Y_0 3.5))
(assert (or (and (>= Y_1 Y_0) (<= Y_2 -1)) (and (>= Y_2 Y_1))))
"""
    p = parse_vnnlib(text)
    # 2 input regions x 2 output conjunctions
    assert len(p.regions) == 4
    boxes = {(float(r.lower[2]), float(r.upper[2])) for r in p.regions}
    assert boxes == {(0.0, 1.0), (2.0, 3.0)}
    r = p.regions[0]
    np.testing.assert_array_equal(r.lower[:2], [0.0, -2.0])
    np.testing.assert_array_equal(r.upper[:2], [1.0, 0.15])
    # Y_0 <= 3.5 is -Y_0 + 3.5 >= 0
    first = r.groups[0][0]
    np.testing.assert_array_equal(first.coef, [-1.0, 0.0, 0.0])
    assert first.const == 3.5
    assert p.holds([0.5, 0, 2.5], [0.0, 1.0, -2.0])      # Y_1 >= Y_0 and Y_2 <= -1
    assert p.holds([0.5, 0, 0.5], [0.0, 1.0, 1.0])       # Y_2 >= Y_1
    assert not p.holds([0.5, 0, 1.5], [0.0, 1.0, 1.0])   # X_2 between the two input regions
    assert not p.holds([0.5, 0, 0.5], [4.0, 5.0, 1.0])   # Y_0 > 3.5


@pytest.mark.parametrize("body, where, words", [
    ("(assert (< Y_0 Y_1))", "5:9", "'<'"),
    ("(assert (<= (+ Y_0 Y_1) 1.0))", "5:13", "arithmetic expressions are not"),
    ("(assert (<= X_0 Y_1))", "5:9", "mix inputs and outputs"),
    ("(assert (<= Y_0 Y_7))", "5:17", "Y_7 is used before it is declared"),
    ("(assert (<= X_0 X_1))", "5:9", "bound one variable"),
    ("(assert (<= Y_0 np.float64(0.0)))", "5:17", "neither a number"),
    ("(assert (<= Y_0 nan))", "5:17", "neither a number"),
    ("(assert (not (<= Y_0 Y_1)))", "5:9", "'not'"),
    ("(assert (<= Y_0 Y_1)", "5:1", "never closed"),
    ("(declare-const Z_0 Real)", "5:16", "not an input X_i"),
    ("(assert (<= Y_0 0)) (declare-const X_9 Real)", "5:21", "before the assertions"),
])
def test_strict_rejections_name_line_and_column(body: str, where: str, words: str) -> None:
    text = "(declare-const X_0 Real)\n(declare-const X_1 Real)\n(declare-const Y_0 Real)\n(declare-const Y_1 Real)\n"
    text += body + "\n(assert (>= X_0 0))\n(assert (<= X_0 1))\n(assert (>= X_1 0))\n(assert (<= X_1 1))\n"
    with pytest.raises(PhalanxError, match="x.vnnlib:" + where) as exc:
        parse_vnnlib(text, "x.vnnlib")
    assert words in str(exc.value)


def test_missing_bound_type_and_gap_are_refused() -> None:
    with pytest.raises(PhalanxError, match="X_1 has no lower bound"):
        parse_vnnlib("(declare-const X_0 Real)\n(declare-const X_1 Real)\n(declare-const Y_0 Real)\n"
                     "(assert (>= X_0 0))\n(assert (<= X_0 1))\n(assert (<= X_1 1))\n(assert (>= Y_0 0))\n")
    with pytest.raises(PhalanxError, match="type 'Int' is not supported"):
        parse_vnnlib("(declare-const X_0 Int)")
    with pytest.raises(PhalanxError, match="X_1 is not declared"):
        parse_vnnlib("(declare-const X_0 Real)\n(declare-const X_2 Real)\n(declare-const Y_0 Real)\n"
                     "(assert (>= Y_0 0))\n")


def test_vnn_number_reads_back_exactly() -> None:
    rng = np.random.default_rng(0)
    for v in [0.0, -0.0, 1e-300, 0.1, 1 / 3, *rng.normal(size=50), np.float64(0.7), np.float32(0.1)]:
        s = vnn_number(v)
        assert "np." not in s and float(s) == float(v)
    with pytest.raises(PhalanxError):
        vnn_number(float("inf"))
