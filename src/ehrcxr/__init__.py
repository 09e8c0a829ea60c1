"""ehrcxr: when does fusing EHR with chest X-rays help clinical prediction?"""

__version__ = "0.1.0"
