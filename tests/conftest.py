import atexit
import os
import shutil
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# the tokenizer and checkpoint-hash caches go to a throwaway folder, never the user's ~/.cache
if "LORA_STUDIO_CACHE" not in os.environ:
    os.environ["LORA_STUDIO_CACHE"] = tempfile.mkdtemp(prefix="lora-studio-test-cache-")
    atexit.register(shutil.rmtree, os.environ["LORA_STUDIO_CACHE"], True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.join(ROOT, "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402

# Two shared cores: more than one torch thread makes steps erratic (OpenMP oversubscription).
torch.set_num_threads(1)
