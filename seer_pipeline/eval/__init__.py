"""Evaluation of frozen trunks: linear probe and k-NN (`seer-eval`)."""
