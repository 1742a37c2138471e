"""The tqdm progress bar class mtjax uses.

`tqdm.auto` picks the widget bar in Jupyter but warns "IProgress not found" when ipywidgets
is missing; the text bar (`tqdm.std`) is used then, without a warning.
"""

import importlib.util

if importlib.util.find_spec("ipywidgets") is not None:
    from tqdm.auto import tqdm
else:
    from tqdm.std import tqdm

__all__ = ["tqdm"]
