"""The ``qmpbackup`` command line: parsing and printing over the API and the repository.

Each command calls only the public API (:mod:`qmpbackup.api`) and the repository's
functions (:mod:`qmpbackup.repo`).
"""
