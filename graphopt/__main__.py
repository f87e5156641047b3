import sys

from graphopt.app.cli import main

sys.exit(main())
