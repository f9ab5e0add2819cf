"""Run open_clip's own trainer (`open_clip_train.main`) with xmodal's model configs registered.

`import xmodal.models` calls `open_clip.add_model_config(xmodal/models/configs)`, so `--model xm-tiny`
resolves to the same config xmodal trains. Everything else is open_clip_train, unchanged:

    python benchmarks/_open_clip_main.py --train-data x.csv --model xm-tiny ...
"""

from __future__ import annotations

import sys

from open_clip_train.main import main

import xmodal.models  # noqa: F401  (registers xm-micro / xm-tiny / xm-small with open_clip)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]) or 0)
