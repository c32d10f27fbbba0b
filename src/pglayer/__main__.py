"""`python -m pglayer`: the `pglayer` command."""

from pglayer._cli import main

main()
