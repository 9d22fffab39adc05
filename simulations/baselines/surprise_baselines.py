#!/usr/bin/env python3
"""Well-known recommenders on exactly fedpref-sim's split, for the reference numbers in
docs/personalisation.md.

    fedpref-sim export-split --dataset movielens-100k --out /tmp/ml100k-split
    python3 simulations/baselines/surprise_baselines.py /tmp/ml100k-split

Needs scikit-surprise (`pip install scikit-surprise==1.1.5 pandas`): a tool for measuring,
not a dependency of fedpref. Prints one JSON object: the RMSE on test.tsv of the global
training mean, Surprise's BaselineOnly (global mean + user and item biases by ALS) and
Surprise's SVD (biased matrix factorisation by SGD), each trained on train.tsv.
"""
import argparse
import json
import math
import os
import time

import pandas as pd
from surprise import SVD, BaselineOnly, Dataset, Reader, accuracy


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("split", help="a directory written by `fedpref-sim export-split`")
    p.add_argument("--svd-factors", type=int, default=100)
    p.add_argument("--svd-epochs", type=int, default=60)
    p.add_argument("--svd-reg", type=float, default=0.08)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    read = lambda name: pd.read_csv(os.path.join(a.split, name), sep="\t", dtype={"user": str, "item": str})
    train, test = read("train.tsv"), read("test.tsv")
    trainset = Dataset.load_from_df(train[["user", "item", "rating"]], Reader(rating_scale=(1, 5))).build_full_trainset()
    pairs = list(zip(test["user"], test["item"], test["rating"]))
    mean = train["rating"].mean()
    out = {
        "split": a.split,
        "train_ratings": len(train),
        "test_ratings": len(test),
        "global_mean_rmse": math.sqrt(((test["rating"] - mean) ** 2).mean()),
    }
    algos = {
        "baseline_only": BaselineOnly(verbose=False),
        "svd": SVD(n_factors=a.svd_factors, n_epochs=a.svd_epochs, reg_all=a.svd_reg, random_state=a.seed),
    }
    for name, algo in algos.items():
        start = time.time()
        algo.fit(trainset)
        out[name + "_rmse"] = accuracy.rmse(algo.test(pairs), verbose=False)
        out[name + "_seconds"] = round(time.time() - start, 1)
    out["svd_settings"] = {"n_factors": a.svd_factors, "n_epochs": a.svd_epochs, "reg_all": a.svd_reg, "random_state": a.seed}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
