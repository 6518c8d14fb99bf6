"""``python -m vertebra`` (the entry point torchrun uses: ``torchrun --nproc_per_node N -m vertebra train ...``)."""

import os
import sys

from .cli import main

if os.environ.get("TORCHELASTIC_ERROR_FILE"):
    # under torchrun: a crashing process writes its traceback where torchrun's failure report picks it up
    from torch.distributed.elastic.multiprocessing.errors import record

    main = record(main)

sys.exit(main())
