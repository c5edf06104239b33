"""`python -m hpc_llm.cli`, as `python -m hpc_llm`."""

import sys

from hpc_llm.cli import main

sys.exit(main())
