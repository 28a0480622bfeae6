"""Every background job kind, registered with ``studio.runs`` on import (the worker imports this).

Each module imports torch/diffusers inside its job function, so starting a worker stays cheap.
"""

from . import jobs_distill, jobs_study, jobs_teacher  # noqa: F401
