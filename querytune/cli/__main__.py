"""`python -m querytune.cli`: the console script (`querytune.cli.main`)."""

from querytune.cli import main

main()
