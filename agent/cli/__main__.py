"""`python -m mediaseal.agent.cli ...`, the same as the `mediaseal` console script."""

import sys

from mediaseal.agent.cli import main

sys.exit(main())
