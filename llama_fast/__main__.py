import sys

from llama_fast.experiments.cli import main

sys.exit(main())
