"""`factory study`: the paper's whole experiment (train -> build -> label -> stats -> fine-tune -> eval -> report) from
one config file, as a graph of resumable stages run on Ray, ending in a report (`report.py`)."""
