import sys

from effvit.bench.cli import main

sys.exit(main())
