"""lmms-eval's `llava_hf` on our export scores a vlmlab benchmark as `vlmlab eval` does.

Runs in its own venv (lmms-eval 0.7.3; see noxfile.py `interop_lmms_eval`). OUT holds what the
project venv wrote: `llava/` (export_tiny.py), `bench/` (`vlmlab eval --make-synthetic`) and
`vlmlab/<bench>/{summary.json,predictions.jsonl}` (`vlmlab eval --vqa-mode lmms_eval`). This
writes a task over the local JSONL (a `json` dataset, no hub) next to lmms_task/utils.py, runs
`python -m lmms_eval` on it and requires the same accuracy and, answer by answer, the same
predictions (so an equal score cannot come from different answers).

    python tests/interop/check_lmms_eval.py OUT BENCH_NAME
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

TASK = """\
task: vlmlab_{name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {jsonl}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answers
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  num_beams: 1
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
metadata:
  - version: 0.0
"""


def main() -> None:
    out, name = Path(sys.argv[1]).resolve(), sys.argv[2]
    jsonl = out / "bench" / f"{name}.jsonl"
    ours = json.loads((out / "vlmlab" / name / "summary.json").read_text())
    max_new_tokens = int(ours["settings"].get("max_new_tokens", 16))
    tasks = out / "lmms_tasks"
    tasks.mkdir(exist_ok=True)
    shutil.copy(Path(__file__).with_name("lmms_task") / "utils.py", tasks / "utils.py")
    (tasks / f"vlmlab_{name}.yaml").write_text(
        TASK.format(name=name, jsonl=jsonl, max_new_tokens=max_new_tokens)
    )
    env = {**os.environ, "VLMLAB_BENCH_DIR": str(jsonl.parent), "HF_HUB_OFFLINE": "1"}
    logs = out / "lmms_logs"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "lmms_eval",
            "--model",
            "llava_hf",
            "--model_args",
            f"pretrained={out / 'llava'},device=cpu,device_map=cpu,dtype=float32",
            "--tasks",
            f"vlmlab_{name}",
            "--include_path",
            str(tasks),
            "--batch_size",
            "1",
            "--log_samples",
            "--output_path",
            str(logs),
        ],
        check=True,
        env=env,
    )
    results = json.loads(next(logs.rglob("*_results.json")).read_text())
    theirs = results["results"][f"vlmlab_{name}"]["accuracy,none"]
    samples = [json.loads(line) for line in next(logs.rglob("*_samples_*.jsonl")).open()]
    ids = [json.loads(line)["id"] for line in jsonl.open()]  # doc_id: the row's position
    lmms_answers = {ids[s["doc_id"]]: str(s["filtered_resps"]) for s in samples}
    our_answers = {
        row["id"]: row["prediction"]
        for row in map(json.loads, (out / "vlmlab" / name / "predictions.jsonl").open())
    }
    differ = [
        (i, our_answers[i], lmms_answers.get(i))
        for i in our_answers
        if our_answers[i].strip() != str(lmms_answers.get(i)).strip()
    ]
    accuracy = ours["metrics"]["accuracy"]
    print(f"{name}: vlmlab eval accuracy {accuracy:.6f}, lmms-eval {theirs:.6f}")
    print(f"predictions equal on {len(our_answers) - len(differ)} of {len(our_answers)}")
    for row in differ[:5]:
        print("  differs:", row)
    if differ or abs(accuracy - theirs) > 1e-9 or len(samples) != len(our_answers):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
