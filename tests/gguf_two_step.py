"""The two-step route, as a user runs it: llama.cpp's own converter on a merged SafeTensors folder.

Run as a script (``python tests/gguf_two_step.py MODEL_DIR OUT.gguf TYPE``). The tests' tiny BPE
tokenizers are not among those llama.cpp knows by their hash, so the converter is told their
pre-tokenizer by name (``gpt-2``, or ``MERGEFLOW_TEST_PRE``), as its maintainers add new ones.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    import convert_hf_to_gguf
    from conversion import base

    pre = os.environ.get("MERGEFLOW_TEST_PRE", "gpt-2")
    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
    model_dir, out, outtype = sys.argv[1:4]
    sys.argv = ["convert_hf_to_gguf", model_dir, "--outfile", out, "--outtype", outtype,
                "--model-name", "m"]
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    main()
