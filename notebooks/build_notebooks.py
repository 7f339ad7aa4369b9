"""Write the Colab notebooks of this folder from the cell sources below.

    python notebooks/build_notebooks.py

The notebooks are generated so that their diffs stay readable and their outputs empty;
edit the cells here and rerun (tests/test_notebooks.py checks that the .ipynb files
match this script, and executes them headless with tiny parameters). The install cell
takes fast-jax from a clone of the repository next to the notebook or from ``REPO_URL``
(empty here: the repository's address is the user's to set). Each notebook has
one code cell tagged ``parameters`` (the papermill convention): a test or papermill
injects its own values in a cell right after it.
"""

from __future__ import annotations

import pathlib

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = pathlib.Path(__file__).resolve().parent
INSTALL = """\
# Where fast-jax comes from when it is not installed yet: the URL of its git repository
# (a branch: "https://github.com/OWNER/fast-jax@BRANCH"). Leave it empty when this notebook
# runs in a clone of the repository, or next to one (`git clone URL` in a first cell).
REPO_URL = ""

import importlib.util
import pathlib
import subprocess
import sys

if importlib.util.find_spec("fast_jax") is None:
    here = pathlib.Path.cwd()
    is_clone = lambda p: (p / "pyproject.toml").is_file() and (p / "fast_jax").is_dir()
    clone = next(filter(is_clone, (here, here.parent, *sorted(here.glob("*/")))), None)
    if clone is None and not REPO_URL:
        raise SystemExit("fast-jax is not installed and no clone of it is here or next to "
                         "this notebook: set REPO_URL in this cell to the repository's URL "
                         "and run the cell again.")
    # A non-editable install: importable at once (no restart) and with the fast-jax command.
    # Colab's preinstalled JAX (its GPU/TPU build) is kept: it fits fast-jax's bounds.
    source = str(clone) if clone is not None else f"git+{REPO_URL}"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", source], check=True)
    importlib.invalidate_caches()

import fast_jax

print("fast-jax", fast_jax.__version__, "from", pathlib.Path(fast_jax.__file__).parent)"""

RUNTIME_NOTE = """\
**Runtime.** On Colab pick *Runtime → Change runtime type → GPU* (or TPU) before running;
it runs on a CPU too, only slower. fast-jax works with JAX 0.6 to 0.12, so the JAX that
Colab preinstalls for its GPU and TPU runtimes stays. Elsewhere, install JAX for your
accelerator with fast-jax: `pip install "fast-jax[cuda12]"` (from a clone:
`pip install ".[cuda12]"`) for an NVIDIA GPU, JAX's own CUDA 12 wheels; for a TPU VM,
JAX's TPU wheel, `pip install "jax[tpu]"`."""

DEVICES = '''\
import jax

print(f"JAX {jax.__version__}, backend: {jax.default_backend()}")
for device in jax.devices():
    print("  ", device)
if jax.default_backend() == "cpu":
    print("No GPU/TPU: training runs on the CPU (fine for a few epochs).")'''

PARAMETERS_NOTE = ("## Parameters\n\nThe next cell is tagged `parameters` (papermill "
                   "convention): the tests run this notebook headless with tiny values "
                   "injected after it.")


QUICKSTART = [
    ("md", f"""\
# fast-jax quickstart: MeLU + FAST on MovieLens-100K

This notebook installs fast-jax, prepares ML-100K (the MeLU/CLOVER splits behind the FAST
paper's numbers), meta-trains the MeLU user model with **FAST**'s adaptive group sampling
(Zhang et al., WWW 2024), and shows the test results per seed and per group, and how the
sampling probability `p` and the group losses move during training.

To run it on Colab, upload it (*File → Upload notebook*) or open it from your copy of the
repository (*File → Open notebook → GitHub*); the first code cell installs fast-jax.

{RUNTIME_NOTE}

The same run from a shell, once fast-jax is installed:

```bash
fast-jax run --backbone melu --method fast --dataset ml100k --out runs/quickstart
```"""),
    ("code", INSTALL),
    ("md", PARAMETERS_NOTE),
    ("code", '''\
DATA_DIR = None              # a folder holding ml-100k-clover/; None: download into the cache
OUT_DIR = "runs/quickstart"  # config.json, metrics.jsonl, results.json and the plot go here
EPOCHS = 50                  # the paper's setting: 50 epochs, 5 seeds, batches of 32 users
SEEDS = 5
BATCH_SIZE = 32''', ["parameters"]),
    ("md", "## The accelerator\n\nJAX picks the GPU or TPU by itself when the runtime has one."),
    ("code", DEVICES),
    ("md", """\
## The data

`fast_jax.data_prep.ensure_prepared` reads the raw files from `DATA_DIR`, or downloads them
(GroupLens and the CLOVER repository's processed states, md5-checked) into the cache
(`$FAST_JAX_CACHE`, default `~/.cache/fast_jax`). It writes padded per-user task arrays
plus a `meta.json` once, and reuses them afterwards. The sensitive attribute is gender:
group 0 = M, group 1 = F. See `docs/data.md` for the schema."""),
    ("code", '''\
from fast_jax.data_prep import ensure_prepared
from fast_jax.dataset import load_prepared

folder = ensure_prepared("ml100k", data_dir=DATA_DIR)
data = load_prepared(folder)
print(folder)
for split, counts in data.meta["counts"].items():
    groups = dict(zip(data.group_names, counts["groups"]))
    print(f"{split:5s}: {counts['users']:4d} users, {counts['ratings']:6d} ratings, {groups}")
print("input fields:", ", ".join(f["name"] for f in data.meta["fields"]))'''),
    ("md", """\
## Train MeLU + FAST

`train_and_evaluate(config, out_dir)` is the function `fast-jax run` calls: it trains
`config.seeds` seeds, tests each on the test users (adapted on their support set, scored on
their last 10 ratings) and writes `config.json`, `metrics.jsonl` and `results.json`.
Settings left unset take the paper's values for the backbone and dataset (Table 3:
`gamma = 2`, `tau = 0.2` for MeLU on ML-100K).

FAST keeps one sampling probability per group. After each batch it compares the groups'
query losses and moves `p[0]` (the probability of drawing a user of group 0) toward the
worse-served group, by `min(gamma * |gap|, tau)` (paper Eq. 9); the outer update then
weights the batch's users as if the batch had been drawn with that group ratio."""),
    ("code", '''\
from fast_jax.config import Config
from fast_jax.experiment import train_and_evaluate

config = Config(dataset="ml100k", data_dir=DATA_DIR, backbone="melu", method="fast",
                epochs=EPOCHS, seeds=SEEDS, batch_size=BATCH_SIZE)
results = train_and_evaluate(config, OUT_DIR, data=data)'''),
    ("md", """\
## Results

`results.json` holds each seed's test metrics (MAE, MSE, NDCG@3, and the group gaps
`gf_* = |group 0 - group 1|`), the per-group values and sizes, and the mean and population
std over seeds. `adaptation` says whether meta-learning personalises at all: how far the
inner loop moved the predictions (`shift`), the share of the gap to each user's support
mean it closed (`closed`) and the MAE without it (`mae_unadapted`). The attacker AUC says
how well a small classifier recovers the gender from the adapted user representations
(0.5: not at all)."""),
    ("code", '''\
import json

import pandas as pd

out = pathlib.Path(OUT_DIR)
res = json.loads((out / "results.json").read_text())
names = data.group_names

summary = pd.DataFrame({key: {"mean": res["mean"][key], "std": res["std"][key]}
                        for key in res["mean"] if key not in ("group", "adaptation")}).T
adaptation = pd.DataFrame({"mean": res["mean"]["adaptation"], "std": res["std"]["adaptation"]})
per_seed = pd.DataFrame([{k: v for k, v in r.items() if isinstance(v, (int, float))}
                         for r in res["per_seed"]]).set_index("seed")
per_group = pd.DataFrame([{"seed": r["seed"], "group": values["name"],
                           **{k: v for k, v in values.items() if k != "name"}}
                          for r in res["per_seed"] for g, values in r["group"].items()])
per_group = per_group.set_index(["seed", "group"])
display(summary.round(4), adaptation.round(4), per_seed.round(4), per_group.round(4))'''),
    ("md", """\
## p and the group losses over the epochs

`metrics.jsonl` has one line per epoch and seed: the training loss, `p` at the end of the
epoch, the mean query loss of each group over the epoch's batches, and validation metrics."""),
    ("code", '''\
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

log = pd.DataFrame([json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()])
fig, (ax_p, ax_loss) = plt.subplots(1, 2, figsize=(12, 4))
for i, (seed, run) in enumerate(log.groupby("seed")):
    ax_p.plot(run["epoch"], [p[0] for p in run["p"]], marker="o", label=f"seed {seed}")
    losses = np.array(run["group_loss"].tolist())
    for g, name in enumerate(names):
        ax_loss.plot(run["epoch"], losses[:, g], marker="o", color=f"C{g}", alpha=0.7,
                     linestyle=("-", "--", ":", "-.")[i % 4], label=name if i == 0 else None)
ax_p.set(xlabel="epoch", ylabel=f"p[0] = P(draw a user of group {names[0]})", ylim=(-0.02, 1.02),
         title="FAST sampling probability")
ax_loss.set(xlabel="epoch", ylabel="query loss of the group's training users",
            title="per-group training loss (one line style per seed)")
for ax in (ax_p, ax_loss):
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend()
fig.tight_layout()
fig.savefig(out / "p_and_group_losses.png", dpi=120)
plt.show()'''),
    ("md", """\
## Next

- Other methods and backbones: `--method {origin,static,reg,ipw,clover,...}`,
  `--backbone metacs`; `fast-jax run --help` lists every flag.
- Your own ratings: `bring_your_own_data.ipynb`.
- A new backbone, fairness method or dataset: `docs/extending.md`."""),
]


BRING_YOUR_OWN_DATA = [
    ("md", f"""\
# Bring your own data

Train a fairness-aware meta-learned user model on your own ratings in four steps:

1. three CSV files: `ratings.csv` (`user,item,rating[,timestamp]`), `users.csv`
   (`user`, feature columns and the sensitive column) and, optionally, `items.csv`
   (`item`, feature columns; a cell with several values separates them by `|`);
2. `fast-jax prep --dataset custom ...` turns them into padded per-user task arrays;
3. train (here the plain meta-learner and FAST);
4. compare the test metrics of the groups.

Here the CSV files are made up with numpy; replace that step with an export of your data.
The format is described in full in `docs/data.md` ("custom: your own data").

{RUNTIME_NOTE}"""),
    ("code", INSTALL),
    ("md", PARAMETERS_NOTE),
    ("code", '''\
WORK_DIR = "byod"             # CSV files, the prepared folder and the runs go here
NUM_USERS = 300               # users of the made-up dataset
METHODS = ["origin", "fast"]  # plain MAML-style meta-learning, then FAST
EPOCHS = 30
SEEDS = 3
BATCH_SIZE = 32
LR = 1e-3                     # outer Adam rate (the paper's 1e-4 is slow on so few users)''',
     ["parameters"]),
    ("md", """\
## 1. Write a small dataset

Two groups of unequal size (30 % F, 70 % M) whose tastes differ by genre; every user rates
13 to 60 distinct items on a 1..5 scale. Users have `age` and `city` features, items a
multi-valued `genres` and a `decade`."""),
    ("code", '''\
import numpy as np
import pandas as pd

work = pathlib.Path(WORK_DIR)
work.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)

GENRES = ["action", "comedy", "drama", "horror", "romance", "scifi"]
TASTE = {"F": np.array([-0.6, 0.4, 0.9, -1.0, 1.1, -0.4]),   # per genre, by group
         "M": np.array([0.8, 0.2, -0.3, 0.5, -0.7, 0.9])}
num_items = 150
item_genres = [rng.choice(len(GENRES), rng.integers(1, 4), replace=False)
               for _ in range(num_items)]
items = pd.DataFrame({
    "item": np.arange(num_items),
    "genres": ["|".join(GENRES[g] for g in sorted(gs)) for gs in item_genres],
    "decade": rng.choice(["1980s", "1990s", "2000s", "2010s"], num_items),
})
gender = rng.choice(["F", "M"], NUM_USERS, p=[0.3, 0.7])
users = pd.DataFrame({
    "user": np.arange(NUM_USERS),
    "age": rng.choice(["<25", "25-34", "35-49", "50+"], NUM_USERS),
    "city": rng.choice(["north", "south", "east", "west"], NUM_USERS),
    "gender": gender,
})
rows = []
for u in range(NUM_USERS):
    bias = rng.normal(0, 0.4)
    for i in rng.choice(num_items, rng.integers(13, 61), replace=False):
        score = 3 + bias + TASTE[gender[u]][item_genres[i]].mean() + rng.normal(0, 0.6)
        rows.append((u, i, int(np.clip(np.rint(score), 1, 5))))
ratings = pd.DataFrame(rows, columns=["user", "item", "rating"])

ratings.to_csv(work / "ratings.csv", index=False)
users.to_csv(work / "users.csv", index=False)
items.to_csv(work / "items.csv", index=False)
print(f"{len(ratings)} ratings of {num_items} items by {NUM_USERS} users "
      f"({(gender == 'F').sum()} F, {(gender == 'M').sum()} M)")
display(ratings.head(3), users.head(3), items.head(3))'''),
    ("md", """\
## 2. Prepare the folder

`--sensitive gender` names the groups: the column's values in sorted order are groups
0, 1, ... (here F = 0, M = 1). It is not an input of the model unless
`--sensitive-as-feature` is given. Users are filtered to 13..100 ratings and split 7:1:2
(train / valid / test) by `--seed`, within each group; the last 10 ratings of a user are
its query set. The cell below runs `fast-jax prep` (as `python -m fast_jax prep`, with this
notebook's Python). The same from Python: `fast_jax.data_prep.prepare("custom", out,
ratings=..., users=..., items=..., sensitive="gender")`."""),
    ("code", '''\
import subprocess
import sys

from fast_jax.dataset import load_prepared

prepared = work / "prepared"
command = [sys.executable, "-m", "fast_jax", "prep", "--dataset", "custom",
           "--ratings", str(work / "ratings.csv"), "--users", str(work / "users.csv"),
           "--items", str(work / "items.csv"), "--sensitive", "gender",
           "--out", str(prepared), "--no-progress"]
print("$ fast-jax", " ".join(command[3:]))
proc = subprocess.run(command, capture_output=True, text=True)
print(proc.stdout, proc.stderr)
proc.check_returncode()

data = load_prepared(prepared)
print("groups:", data.group_names)
display(pd.DataFrame(data.meta["fields"])[["name", "side", "kind", "start", "stop", "vocab_size"]])'''),
    ("md", """\
## 3. Train

One `train_and_evaluate` per method on the prepared folder, each into its own run folder
(`config.json`, `metrics.jsonl`, `results.json`). From a shell:
`fast-jax run --dataset byod/prepared --method fast --out byod/runs/fast`."""),
    ("code", '''\
from fast_jax.config import Config
from fast_jax.experiment import train_and_evaluate

results = {}
for method in METHODS:
    config = Config(dataset=str(prepared), backbone="melu", method=method, epochs=EPOCHS,
                    seeds=SEEDS, batch_size=BATCH_SIZE, lr=LR, out_bias="mean")
    results[method] = train_and_evaluate(config, work / "runs" / method, data=data)'''),
    ("md", """\
## 4. Per-group report

Test metrics per group (mean over seeds) and the gaps between the groups,
`GF(M) = |M(group 0) - M(group 1)|`: lower is fairer."""),
    ("code", '''\
names = data.group_names
report = pd.DataFrame([
    {"method": method, "group": names[int(g)], "users": int(v["n"]), "MAE": v["mae"],
     "MSE": v["mse"], "NDCG@3": v["ndcg3"]}
    for method, res in results.items() for g, v in res["mean"]["group"].items()
]).set_index(["method", "group"])
gaps = pd.DataFrame({method: {"MAE": res["mean"]["mae"], "GF(MAE)": res["mean"]["gf_mae"],
                              "GF(MSE)": res["mean"]["gf_mse"],
                              "GF(NDCG@3)": res["mean"]["gf_ndcg3"]}
                     for method, res in results.items()}).T
report.to_csv(work / "group_report.csv")
print(report.round(4).to_string(), end="\\n\\n")
print(gaps.round(4).to_string())'''),
]


NOTEBOOKS = {"quickstart.ipynb": QUICKSTART, "bring_your_own_data.ipynb": BRING_YOUR_OWN_DATA}


def build(name: str) -> nbformat.NotebookNode:
  """The notebook ``name`` with deterministic cell ids and no outputs."""
  nb = new_notebook(metadata={
      "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
      "language_info": {"name": "python"},
      "accelerator": "GPU",
      "colab": {"provenance": [], "toc_visible": True},
  })
  for i, (kind, source, *tags) in enumerate(NOTEBOOKS[name]):
    cell = new_markdown_cell(source) if kind == "md" else new_code_cell(source)
    cell.id = f"{pathlib.Path(name).stem.replace('_', '-')}-{i:02d}"
    if tags:
      cell.metadata["tags"] = list(tags[0])
    nb.cells.append(cell)
  nbformat.validate(nb)
  return nb


def render(name: str) -> str:
  return nbformat.writes(build(name)) + "\n"


def main() -> None:
  for name in NOTEBOOKS:
    (HERE / name).write_text(render(name), encoding="utf-8")
    print(HERE / name)


if __name__ == "__main__":
  main()
