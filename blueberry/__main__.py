"""`python -m blueberry ...` = the `blueberry` command; torchrun uses it: `torchrun ... -m blueberry run SPEC`."""

from blueberry.cli import console_main

console_main()
