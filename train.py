"""`python train.py ...` from the repo root: identical to `vlmlab train ...`."""

from vlmlab.cli import train_main

if __name__ == "__main__":
    train_main()
