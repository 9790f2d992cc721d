"""VNN-COMP interchange: phalanx's exports read back to the same queries (VNN-LIB 1.0 on the
composite network and the relational VNN-LIB 2.0 form on the members), the merged ONNX equals
the members, and ``verify vnnlib`` / ``verify instances`` write VNN-COMP result files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from verif_nets import ARCHS

from conftest import run_cli

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from phalanx.verification import create_verifier, make_query  # noqa: E402
from phalanx.verification.export import export_query  # noqa: E402
from phalanx.verification.interchange import instance_queries, load_instance  # noqa: E402


def _members(n: int) -> list:
    return [ARCHS["linear-relu"](s) for s in range(n)]


def _same_query(a, b) -> None:  # type: ignore[no-untyped-def]
    for u, v in zip(a.box(), b.box(), strict=True):
        np.testing.assert_array_equal(u, v)
    assert a.required == b.required and len(a.groups()) == len(b.groups())
    for ga, gb in zip(a.groups(), b.groups(), strict=True):
        assert len(ga) == len(gb) and all(np.array_equal(u, v) for u, v in zip(ga, gb, strict=True))


def _outputs(q, x):  # type: ignore[no-untyped-def]
    return np.concatenate([n.forward(x) for n in q.nets], axis=-1)


def test_export_reads_back_to_identical_queries(tmp_path) -> None:  # type: ignore[no-untyped-def]
    x0 = np.random.default_rng(1).uniform(0, 1, 72)
    q = make_query(_members(2), x0, 0.05, 1)
    paths = export_query(q, tmp_path)
    text = open(paths["property"]).read()
    assert "np.float64" not in text and "np." not in text
    nets, prop = load_instance(paths["network"], paths["property"])
    [back] = instance_queries(nets, prop)
    _same_query(q, back)
    xs = np.random.default_rng(2).uniform(*q.box(), size=(50, 72))
    np.testing.assert_allclose(_outputs(back, xs), _outputs(q, xs), rtol=0, atol=1e-9)
    # the relational VNN-LIB 2.0 form on the member files reads back to the same query too
    nets2, prop2 = load_instance(paths["members"], paths["relational_property"])
    assert prop2.version == "2.0" and [n.name for n in prop2.networks] == ["member0", "member1"]
    [rel] = instance_queries(nets2, prop2)
    _same_query(q, rel)
    np.testing.assert_allclose(_outputs(rel, xs), _outputs(q, xs), rtol=0, atol=1e-9)
    # and the three decide alike
    milp = create_verifier("milp")
    verdicts = {milp.verify(v, time_limit_s=60).verdict for v in (q, back, rel)}
    assert len(verdicts) == 1 and next(iter(verdicts)).decided


def test_majority_export_is_the_same_property(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Majority (at least 2 of 3 members err) is written as a disjunction of conjunctions; read
    back, it holds on exactly the outputs where 2+ members have a class reaching the label's."""
    x0 = np.random.default_rng(3).uniform(0, 1, 72)
    q = make_query(_members(3), x0, 0.03, 2, kind="majority")
    paths = export_query(q, tmp_path)
    _, prop = load_instance(paths["network"], paths["property"])
    _, prop2 = load_instance(paths["members"], paths["relational_property"])
    rng = np.random.default_rng(4)
    for _ in range(300):
        y = rng.normal(size=12)
        erring = sum(bool(np.max(np.delete(y[4 * m:4 * m + 4], 2)) >= y[4 * m + 2]) for m in range(3))
        assert prop.holds(x0, y) == prop2.holds(x0, y) == (erring >= 2)


def test_merged_onnx_equals_the_members_in_onnxruntime(tmp_path) -> None:  # type: ignore[no-untyped-def]
    q = make_query(_members(3), np.full(72, 0.5), 0.1, 0)
    paths = export_query(q, tmp_path)
    merged = ort.InferenceSession(paths["network"])
    parts = [ort.InferenceSession(p) for p in paths["members"]]
    for x in np.random.default_rng(5).uniform(0, 1, size=(20, 1, 2, 6, 6)).astype(np.float32):
        got = merged.run(None, {"X": x})[0]
        want = np.concatenate([s.run(None, {"X": x})[0] for s in parts], axis=-1)
        np.testing.assert_array_equal(got, want)


# --- verify vnnlib on the network of Amir et al. fig. 1: Y = W2 relu(W1 x), Y_0 = 6 x_1 near (1, -5)

def _toy_onnx(path) -> None:  # type: ignore[no-untyped-def]
    w1 = numpy_helper.from_array(np.array([[2, 2], [1, 0]], np.float32), "W1")
    w2 = numpy_helper.from_array(np.array([[1, 6], [2, 3]], np.float32), "W2")
    g = helper.make_graph([helper.make_node("Gemm", ["X", "W1"], ["h"], transB=1),
                           helper.make_node("Relu", ["h"], ["r"]), helper.make_node("Gemm", ["r", "W2"], ["Y"], transB=1)],
                          "toy", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 2])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 2])], [w1, w2])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    path.write_bytes(m.SerializeToString())


def _toy_property(path, threshold: float) -> None:  # type: ignore[no-untyped-def]
    path.write_text("(declare-const X_0 Real)\n(declare-const X_1 Real)\n(declare-const Y_0 Real)\n"
                    "(declare-const Y_1 Real)\n(assert (>= X_0 0.9))\n(assert (<= X_0 1.1))\n"
                    f"(assert (>= X_1 -5.1))\n(assert (<= X_1 -4.9))\n(assert (>= Y_0 {threshold}))\n")


@pytest.fixture()
def toy(tmp_path):  # type: ignore[no-untyped-def]
    _toy_onnx(tmp_path / "toy.onnx")
    _toy_property(tmp_path / "sat.vnnlib", 6.5)     # needs x_1 >= 1.0833: a corner of the box
    _toy_property(tmp_path / "unsat.vnnlib", 6.7)   # needs x_1 >= 1.1167 > 1.1
    return tmp_path


def test_verify_vnnlib_sat_writes_a_checked_counterexample(toy, capsys) -> None:  # type: ignore[no-untyped-def]
    code, out, err = run_cli(["verify", "vnnlib", str(toy / "toy.onnx"), str(toy / "sat.vnnlib"), "--timeout", "30",
                              "--out", str(toy / "r1")], capsys)
    assert code == 0, err
    lines = (toy / "r1" / "result.txt").read_text().split("\n")
    assert lines[0] == "sat" and lines[1] == "(" and out.startswith("sat")
    xs = {ln.split()[0][1:]: float(ln.split()[1][:-1]) for ln in lines[2:] if ln.startswith("(X_") or ln.startswith("(Y_")}
    x = np.array([xs["X_0"], xs["X_1"]])
    assert 0.9 <= x[0] <= 1.1 and -5.1 <= x[1] <= -4.9
    y = ort.InferenceSession(str(toy / "toy.onnx")).run(None, {"X": x.astype(np.float32)[None]})[0][0]
    assert abs(y[0] - xs["Y_0"]) < 1e-6 and abs(y[1] - xs["Y_1"]) < 1e-6 and xs["Y_0"] >= 6.5
    assert abs(6 * x[0] - xs["Y_0"]) < 1e-5  # the hand-computed network
    res = json.loads((toy / "r1" / "results.json").read_text())
    assert res["result"] == "sat" and res["details"]["holds_onnxruntime"]


def test_verify_vnnlib_unsat_and_instances(toy, capsys) -> None:  # type: ignore[no-untyped-def]
    code, out, err = run_cli(["verify", "vnnlib", str(toy / "toy.onnx"), str(toy / "unsat.vnnlib"), "--timeout",
                              "30", "--result-file", str(toy / "u.txt"), "--out", str(toy / "r2")], capsys)
    assert code == 0, err
    assert (toy / "u.txt").read_text() == "unsat\n" and out.startswith("unsat")
    (toy / "instances.csv").write_text("toy.onnx,sat.vnnlib,30\ntoy.onnx,unsat.vnnlib,30\nmissing.onnx,sat.vnnlib,5\n")
    code, out, err = run_cli(["verify", "instances", str(toy / "instances.csv"), "--no-progress",
                              "--out", str(toy / "r3")], capsys)
    assert code == 0, err
    rows = json.loads((toy / "r3" / "results.json").read_text())["instances"]
    assert [r["result"] for r in rows] == ["sat", "unsat", "error"]
    assert "not found" in rows[2]["message"]
    assert (toy / "r3" / "toy__unsat.result").read_text() == "unsat\n"
    assert (toy / "r3" / "toy__sat.result").read_text().startswith("sat\n(")
    assert "sat 1, unsat 1, timeout 0, error 1" in (toy / "r3" / "summary.md").read_text()


def test_verify_vnnlib_user_errors_are_one_line(toy, capsys) -> None:  # type: ignore[no-untyped-def]
    (toy / "bad.vnnlib").write_text("(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(assert (< X_0 1))\n")
    cases = ((["verify", "vnnlib", str(toy / "nope.onnx"), str(toy / "sat.vnnlib")], "not found"),
             (["verify", "vnnlib", str(toy / "toy.onnx"), str(toy / "bad.vnnlib")], "bad.vnnlib:3:9"),
             (["verify", "vnnlib", str(toy / "toy.onnx"), str(toy / "sat.vnnlib"), "--timeout", "0"], "timeout"))
    for k, (args, words) in enumerate(cases):
        code, _, err = run_cli([*args, "--out", str(toy / f"e{k}")], capsys)
        assert code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1, err
        assert words in err


def test_mean_logits_export_reads_back(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The mean-of-logits composite (branches stacked and averaged in ONNX) imports as the members
    with a mean head: the same box, the same groups (1/M per member) and the same outputs."""
    q = make_query(_members(3), np.full(72, 0.4), 0.05, 1, kind="mean-logits")
    paths = export_query(q, tmp_path)
    assert "relational_property" not in paths
    nets, prop = load_instance(paths["network"], paths["property"])
    [back] = instance_queries(nets, prop)
    assert len(back.nets) == 3 and back.required == 1
    for u, v in zip(q.box(), back.box(), strict=True):
        np.testing.assert_array_equal(u, v)
    for u, v in zip(q.groups()[0], back.groups()[0], strict=True):
        np.testing.assert_allclose(u, v, rtol=0, atol=1e-15)
    xs = np.random.default_rng(6).uniform(*q.box(), size=(20, 72))
    np.testing.assert_allclose(_outputs(back, xs), _outputs(q, xs), rtol=0, atol=1e-9)
    np.testing.assert_allclose(nets[0].forward(xs), nets[0].run_onnxruntime(xs), atol=1e-5)


def test_a_backend_crash_is_an_error_result_not_a_lost_run(toy, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The verifiers' one error boundary (``Verifier.verify_guarded``): an instance whose backend
    raises is reported as ``error`` with the exception named, like the engine's crashed tasks."""
    from phalanx.verification.bab import BabVerifier
    from phalanx.verification.interchange import verify_instance

    def boom(self, query, *, time_limit_s):  # type: ignore[no-untyped-def]
        raise RuntimeError("shape mismatch in a stage")

    monkeypatch.setattr(BabVerifier, "verify", boom)
    res = verify_instance(toy / "toy.onnx", toy / "unsat.vnnlib", timeout_s=10, verifier="bab")
    assert res.result == "error" and "RuntimeError: shape mismatch in a stage" in res.message
