"""`python -m experts train-expert | distill | eval ...` (the same subcommands as `plugmoe`)."""

from experts.cli import main

raise SystemExit(main())
