"""Reports: Markdown tables and plots rendered from result files."""

from phalanx.reports.attack_plots import plot_adversarial_grid, plot_decision_regions, plot_heatmap
from phalanx.reports.markdown import curves_table, pct, scope_line, table
from phalanx.reports.plots import plot_accuracy_curves, plot_training_history

__all__ = ["curves_table", "pct", "plot_accuracy_curves", "plot_adversarial_grid", "plot_decision_regions",
           "plot_heatmap", "plot_training_history", "scope_line", "table"]
