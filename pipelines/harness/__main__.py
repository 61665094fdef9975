"""`python -m zoo.pipelines.harness lm-eval|lmms-eval|tasks ...` (see `zoo.pipelines.harness.cli`)."""

import sys

from zoo.pipelines.harness.cli import main

sys.exit(main())
