"""`python -m vlmlab <verb>`."""

from vlmlab.cli import main

main()
