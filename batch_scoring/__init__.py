"""Batch and backfill scoring with the model versions and feature code that serve online.

reader (Parquet/CSV requests in fixed chunks) -> features (Redis MGET or a Parquet snapshot of
the same encoded vectors) -> score (the online decode, assembly and calibration) -> runner (the
resumable chunk loop and its manifest); evaluate joins scores with labels; distributed runs the
same scoring function as a Ray Data stage.
"""
