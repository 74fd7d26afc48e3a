"""Keep library noise out of the demo's output: transformers' loading bars and FutureWarnings,
and bitsandbytes' note about optional CPU kernels (it falls back to its own). Import first."""

import logging
import os
import warnings

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", category=FutureWarning)
