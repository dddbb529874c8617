"""The seams: formats that cross folders (RunSpec, ClusterSpec, Plan, the run ledger).

The ground floor: every package imports these, and they import nothing of the project. Each
module is a pydantic model of one document, plus the YAML loader that turns a user's mistakes
into one readable line each and the atomic file replacement every writer uses.
"""
