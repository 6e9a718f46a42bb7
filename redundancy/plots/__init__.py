"""The study's figures and tables, each drawn from recorded results by one function.

    from redundancy.results import load_results, load_samples
    from redundancy.plots import layer_ratio_figure, save_figure
    df, samples = load_results("results/sweep"), load_samples("results/sweep")
    save_figure(layer_ratio_figure(df, samples, model="micro-llava-vanilla"), "fig1a", "results/figures")

``curves`` (Fig. 1a, 3, 4), ``images`` (Fig. 1b, 5, from :mod:`~redundancy.plots.records`),
``tables`` (Tables 4, 5, training), ``frames`` (row selection), ``style`` (look, writing).
``python -m redundancy.figures`` rebuilds them all; the notebooks call the same functions.
"""

from redundancy.plots.curves import flops_tradeoff_figure, layer_ratio_figure, trained_figure
from redundancy.plots.frames import MissingInput, NothingToDraw, accuracy_long, latest, select
from redundancy.plots.images import attention_figure, attention_layers_figure, retained_figure
from redundancy.plots.records import MapRecord, load_all_maps, load_maps
from redundancy.plots.style import save_figure
from redundancy.plots.tables import Table, inference_table, lambda_table, markdown, training_table, write_table

__all__ = [
    "MapRecord", "MissingInput", "NothingToDraw", "Table", "accuracy_long", "attention_figure",
    "attention_layers_figure", "flops_tradeoff_figure", "inference_table", "lambda_table", "latest",
    "layer_ratio_figure", "load_all_maps", "load_maps", "markdown", "retained_figure", "save_figure", "select",
    "trained_figure", "training_table", "write_table",
]
