import sys

from hpc_llm.cli import main

sys.exit(main())
