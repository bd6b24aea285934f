"""Serve the MagicAnimate web demo from a checkout: ``python demo/app.py --pretrained DIR [--port 7860]``.

The same as ``magicanimate demo ...``; every option is listed by ``python demo/app.py --help``.
"""

import sys

from magicanimate.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
