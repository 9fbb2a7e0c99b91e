"""`erasekit audit`: one resumable run that says how well a delta erases a suite's concept: the rates with no
attack (the unedited model and the delta), the three attacks, the random-prompt base rate and, on the testbed,
the same for an oracle trained without the concept. `runner` does the work through the evaluation and attack
runners, `report` writes report.html, `commands` is the command line."""

ATTACKS = ("unlearndiff", "p4d", "ringabell")  # the attacks an audit runs, in order (here: `audit --help` names them)
