"""Run a training example as `python` would, appending every batch the model trains on to a JSON-lines log.

    python tests/record_batches.py LOG examples/finetune_ep.py ARGS...
"""

import json
import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_moe import HfMoeForCausalLM  # noqa: E402

if __name__ == "__main__":
    log, script = sys.argv[1], sys.argv[2]
    forward = HfMoeForCausalLM.forward

    def recording_forward(self, input_ids=None, **kwargs):
        if self.training:
            with open(log, "a") as f:
                f.write(json.dumps(input_ids.tolist()) + "\n")
        return forward(self, input_ids=input_ids, **kwargs)

    HfMoeForCausalLM.forward = recording_forward
    sys.argv = [script, *sys.argv[3:]]
    runpy.run_path(script, run_name="__main__")
