# Type stubs of the Rust extension moescope._native (python/src/). The public,
# documented API is moescope/__init__.py, which converts its inputs to the
# C-contiguous float32/float64 (and int64) arrays these functions take.
from os import PathLike
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import numpy.typing as npt

Floats = Union[npt.NDArray[np.float32], npt.NDArray[np.float64]]

__version__: str

def weight_overlap(experts: Floats, granularity: str) -> Tuple[npt.NDArray[np.float64], float]: ...
def weight_chance(shape: Sequence[int], granularity: str) -> float: ...
def orth_loss(experts: Floats, granularity: str, variant: str) -> Tuple[float, Floats]: ...
def activation_overlap(
    outputs: List[Floats],
    dense: bool,
    selected: npt.NDArray[np.int64],
) -> str: ...
def routing_telemetry(
    selected: npt.NDArray[np.int64], n_experts: int, probs: Optional[npt.NDArray[np.float32]] = None
) -> str: ...
def jacobian_alignment(
    w_up: Floats,
    w_down: Floats,
    x: Floats,
    selected: npt.NDArray[np.int64],
    w_gate: Optional[Floats] = None,
    b_up: Optional[Floats] = None,
    b_down: Optional[Floats] = None,
    activation: str = "silu",
    mode: str = "exact",
    pairs: str = "routed",
    probs: Optional[npt.NDArray[np.float32]] = None,
    seed: int = 0,
    spectra_tokens: int = 0,
    null_draws: int = 20,
    null_init_tokens: int = 0,
    precision: str = "f32",
) -> str: ...
def subspaces(rows: List[Floats], rank: str = "16", weights: Optional[List[Floats]] = None) -> str: ...
def analyze(model: str, options: str) -> str: ...
def read_metrics(path: Union[str, PathLike[str]]) -> str: ...
def bench_weight_overlap(e: int, r: int, c: int, granularity: str, reps: int) -> float: ...
def bench_orth_loss(e: int, r: int, c: int, reps: int) -> float: ...
