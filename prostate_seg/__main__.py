"""``python -m prostate_seg {train,evaluate,predict,prepare,synthetic,report} [...]``."""

from prostate_seg.cli import main

main()
