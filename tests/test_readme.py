"""The README and docs/: the Library snippet runs as written, every relative link resolves, the README fits,
and its test command is the one .ci/run runs.

The snippet runs in a fresh Python process in an empty directory (it must be complete: imports, data, training,
adaptation, prediction), followed by a few lines that report the variables it defines.
"""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCUMENTS = [README, ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MAX_README_BYTES = 10_500
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)
# Nothing may point outside the repository: no specification file, no machine paths, no tracker references.
OUTSIDE = re.compile(r"\bSPEC\b|/work/|\bthe issue\b|\bissue #?\d+|(?<![\w/])#\d+\b", re.I)

REPORT = """
import json as _json
import keras as _keras
print("SNIPPET " + _json.dumps({
    "predictions_shape": list(np.shape(predictions)),
    "accuracy": float(accuracy),
    "metric_names": sorted(metrics),
    "loss": float(metrics["loss"]),
    "adapted_is_model": isinstance(adapted, _keras.Model),
    "same_size": adapted.count_params() == learner.count_params(),
}))
"""


def library_snippet():
    """The first python block under the README's "## Library" heading."""
    section = README.read_text(encoding="utf-8").split("\n## Library\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"^```python\n(.*?)^```", section, re.M | re.S)
    assert match, "no ```python block under ## Library"
    return match.group(1)


def test_library_snippet_runs_as_written(tmp_path):
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        [sys.executable, "-c", library_snippet() + REPORT],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("SNIPPET ")]
    assert lines, result.stdout[-2000:]
    report = json.loads(lines[-1].removeprefix("SNIPPET "))
    assert report["predictions_shape"] == [5 * 15]  # one prediction per query image of a 5-way, 15-query task
    assert 0.0 <= report["accuracy"] <= 1.0
    assert report["metric_names"] == ["accuracy", "loss"] and math.isfinite(report["loss"])
    assert report["adapted_is_model"] and report["same_size"]


def heading_anchors(path):
    """GitHub's anchors of a Markdown file's headings (outside code blocks)."""
    anchors = set()
    for line in FENCE.sub("", path.read_text(encoding="utf-8")).splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def test_every_relative_link_points_into_the_repository():
    broken = []
    for document in DOCUMENTS:
        for target in LINK.findall(FENCE.sub("", document.read_text(encoding="utf-8"))):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            path = (document.parent / file_part).resolve() if file_part else document
            if not path.is_relative_to(ROOT) or not path.exists():
                broken.append(f"{document.relative_to(ROOT)}: {target}")
            elif anchor and path.suffix == ".md" and anchor not in heading_anchors(path):
                broken.append(f"{document.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, broken


def test_nothing_refers_outside_the_repository():
    found = [
        f"{document.relative_to(ROOT)}: {match.group(0)!r}"
        for document in DOCUMENTS
        for match in OUTSIDE.finditer(document.read_text(encoding="utf-8"))
    ]
    assert not found, found


def test_readme_fits():
    size = len(README.read_bytes())
    assert size <= MAX_README_BYTES, f"README.md is {size} bytes; move details to docs/"


def test_readme_test_command_is_what_ci_runs():
    section = README.read_text(encoding="utf-8").split("Install and run the tests", 1)[1]
    readme_command = re.search(r"^```bash\n(.*?)\n```", section, re.M | re.S).group(1).strip()
    ci_command = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()[-1]
    # .ci/run installs quietly and through the interpreter it then runs; otherwise the commands are the same.
    assert ci_command.replace("python -m pip install -q ", "pip install ") == readme_command
