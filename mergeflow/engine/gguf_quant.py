"""GGUF types llama.cpp's quantizer makes (the k-quants people ship, ``q4_k_m`` first), from the
16-bit GGUF that :mod:`mergeflow.engine.gguf` streams from the merge.

The types are llama.cpp's own (``llama_cpp.LLAMA_FTYPE_MOSTLY_*``), quantized by llama.cpp itself
(``llama_cpp.llama_model_quantize``, every core): the bytes are what ``llama-quantize`` makes of
the same 16-bit file. Offered: the types that need no importance matrix
(``q2_k``, ``q3_k`` ... ``q6_k`` with their ``_s``/``_m``/``_l`` mixes,
``q4_0``/``q4_1``/``q5_0``/``q5_1``, ``iq4_nl``, ``iq4_xs``). llama-cpp-python comes with
``scripts/setup --gguf``; without it these types are refused while planning, naming the fix.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
from pathlib import Path

from mergeflow.errors import InputError, MergeError

#: Types :mod:`mergeflow.engine.gguf` writes as the merge streams (through llama.cpp's converter).
STREAMED = ("f16", "bf16", "q8_0")
#: The 16-bit types, which the quantizer's types are made from.
SIXTEEN_BIT = ("f16", "bf16")
# the types llama-quantize makes without an importance matrix (iq1/iq2/q2_k_s need one)
_OFFERED = re.compile(r"^(q2_k|q[3-6]_k(_[sml])?|q[45]_[01]|iq4_(nl|xs))$")
_PREFIX = "LLAMA_FTYPE_MOSTLY_"


def _llama_cpp(gguf_type: str):
    try:
        import llama_cpp
    except ImportError:
        raise InputError(f"`gguf_type={gguf_type}` is made by llama.cpp's quantizer, which is not "
                         "installed: run scripts/setup --gguf (llama-cpp-python and llama.cpp's "
                         "converter)") from None
    return llama_cpp


def _file_types(gguf_type: str) -> dict[str, int]:
    """Every file type llama.cpp's quantizer knows, by lower-case name -> ``llama_ftype``."""
    llama_cpp = _llama_cpp(gguf_type)
    return {name.removeprefix(_PREFIX).lower(): int(value) for name, value in vars(llama_cpp).items()
            if name.startswith(_PREFIX)}


def quantizer_types(gguf_type: str = "q4_k_m") -> dict[str, int]:
    """llama.cpp's file types this route offers, by lower-case name -> ``llama_ftype`` value
    (``gguf_type``: the type asked for, named in the refusal when llama.cpp is missing)."""
    return {name: value for name, value in _file_types(gguf_type).items() if _OFFERED.match(name)}


def split_types(text: str) -> list[str]:
    """``--gguf-type q4_k_m,q8_0``: the types asked for, in order, each once."""
    return list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))


def made_from(types: list[str], dtype: str) -> str | None:
    """The 16-bit type the other files are quantized from when ``types`` need llama.cpp's
    quantizer (a 16-bit type asked for, else :func:`source_type`); None when one streamed type
    is all that is asked (it is written straight from the merge)."""
    if len(types) == 1 and types[0] in STREAMED:
        return None
    return next((t for t in types if t in SIXTEEN_BIT), source_type(dtype))


def converted_type(types: list[str], dtype: str) -> str:
    """The type llama.cpp's converter writes from the merge: the 16-bit one the others are
    quantized from (:func:`made_from`), else the one streamed type asked for."""
    return made_from(types, dtype) or types[0]


def check_type(gguf_type: str) -> None:
    """Refuse a type neither streamed here nor made by llama.cpp's quantizer.

    Raises:
        InputError: naming the type and the choices.
    """
    if gguf_type in STREAMED:
        return
    offered = quantizer_types(gguf_type)
    if gguf_type not in offered:
        raise InputError(f"`gguf_type={gguf_type}`: choose {', '.join(STREAMED)} or one of "
                         f"llama.cpp's quantizer types: {', '.join(sorted(offered))}")


def source_type(dtype: str) -> str:
    """The 16-bit GGUF type to quantize from, for a merge planned in ``dtype`` (safetensors'
    name: ``BF16``, ``F16``, ``F32``): bf16 for a bfloat16 merge (f16 could overflow its
    range), else f16, as llama.cpp's converter picks for ``--outtype auto``."""
    return "bf16" if dtype == "BF16" else "f16"


@contextlib.contextmanager
def quiet_llama():
    """llama.cpp logs every tensor it quantizes and every model it loads (through
    llama-cpp-python's logger); keep all but its errors out of the user's terminal."""
    from llama_cpp import _logger

    level = _logger.logger.level
    _logger.logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        _logger.logger.setLevel(level)


def quantize(source: Path, dest: Path, gguf_type: str, threads: int) -> None:
    """Quantize the GGUF ``source`` into ``dest`` as ``gguf_type`` with llama.cpp, on
    ``threads`` threads; ``dest`` is fsynced before this returns.

    Raises:
        MergeError: llama.cpp's quantizer failed.
    """
    llama_cpp = _llama_cpp(gguf_type)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = _file_types(gguf_type)[gguf_type]
    params.nthread = max(1, threads)
    with quiet_llama():
        code = llama_cpp.llama_model_quantize(str(source).encode(), str(dest).encode(),
                                              ctypes.byref(params))
    if code != 0:
        dest.unlink(missing_ok=True)
        raise MergeError(f"{dest.name}: llama.cpp's quantizer failed (code {code}) on {source.name}")
    with open(dest, "rb") as f:
        os.fsync(f.fileno())
