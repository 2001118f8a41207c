"""What the run readout carries on held-out sites: the ceiling of what the LLM can read from it.

    python benchmarks/readout_heldout.py CORPUS.jsonl SERIES_DIR TOKENIZER_DIR [--heldout-sites A,B,C]

Fits the readout (model/readout.py) on the training sites exactly as ``fmrilm pretrain`` does,
then scores the held-out sites: AUROC of the diagnosis and sex scores, and for each task of the
default task list the balanced accuracy of a one-feature logistic regression from the task's
readout score (fitted on the training runs' cross-fitted scores: the mapping the LLM has to learn)
to its answer, beside logistic regression on FC fitted on the same training runs (the gates'
baseline). Prints one JSON object.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np


def main(corpus: str, series: str, tokenizer_dir: str, heldout: list[str] | None = None) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    from bids_fmrilm.model.config import get_config
    from bids_fmrilm.model.tasks import default_tasks
    from bids_fmrilm.tokenizer import Tokenizer
    from bids_fmrilm.training.evaluate_lm import fc_logistic
    from bids_fmrilm.training.lm import prepare_data, run_readouts, split_sites

    t0 = time.time()
    tok = Tokenizer.load(tokenizer_dir)
    data = prepare_data(corpus, series, tok, log=lambda m: None)
    held = heldout or tok.meta["training"]["heldout_sites"]
    train, test = split_sites(data, held)
    cfg = get_config("cpu")
    tasks = default_tasks(cfg.descriptor_questions)
    readout, vals = run_readouts(data, train, tasks, cfg, log=lambda m: None)
    col = {n: j for j, n in enumerate(readout.names)}
    out: dict = {"tokenizer": tokenizer_dir, "heldout_sites": held, "n_test": int(len(test)),
                 "readout_values": readout.dim, "tasks": {}}
    for task in tasks:
        where, _, key = task.source.partition(":")
        name = f"z:{key}" if where == "descriptor" else next((n for n in readout.names if n.startswith(task.name + ":")), None)
        if name not in col:
            continue
        ytr = [task.answer_for(data.phenotype[i], data.z[i]) for i in train]
        yte = [task.answer_for(data.phenotype[i], data.z[i]) for i in test]
        ktr = np.array([a is not None for a in ytr])
        kte = np.array([a is not None for a in yte])
        ai = {a: k for k, a in enumerate(task.answers)}
        a_tr = np.array([ai[a] for a in np.array(ytr, dtype=object)[ktr]])
        a_te = np.array([ai[a] for a in np.array(yte, dtype=object)[kte]])
        x_tr, x_te = vals[train[ktr], col[name]][:, None], vals[test[kte], col[name]][:, None]
        clf = LogisticRegression(class_weight="balanced", max_iter=1000).fit(x_tr, a_tr)
        res = {"score": name, "readout_bacc": round(float(balanced_accuracy_score(a_te, clf.predict(x_te))), 3)}
        fp = fc_logistic(data.fc[train[ktr]], a_tr, data.fc[test[kte]])
        res["fc_logistic_bacc"] = round(float(balanced_accuracy_score(a_te, fp.argmax(1))), 3)
        if len(task.answers) == 2 and len(np.unique(a_te)) == 2:
            s = x_te[:, 0] * (1 if clf.coef_[0, 0] >= 0 else -1)
            res["readout_auroc"] = round(float(roc_auc_score(a_te, s)), 3)
            res["fc_logistic_auroc"] = round(float(roc_auc_score(a_te, fp[:, 1])), 3)
        out["tasks"][task.name] = res
    out["crossfit"] = readout.info.get("crossfit")
    out["seconds"] = round(time.time() - t0, 1)
    return out


if __name__ == "__main__":
    args = sys.argv[1:]
    held = None
    if "--heldout-sites" in args:
        i = args.index("--heldout-sites")
        held = args[i + 1].split(",")
        args = args[:i] + args[i + 2:]
    if len(args) != 3:
        sys.exit(__doc__)
    print(json.dumps(main(*args, heldout=held), indent=1))
