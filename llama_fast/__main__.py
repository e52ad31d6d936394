import sys

from llama_fast.cli import main

sys.exit(main())
