# twistd imports this file while scanning for plugins: it must import nothing but the ServiceMaker.
from twisted.application.service import ServiceMaker

clusterdWorker = ServiceMaker(
    "clusterd worker",
    "clusterd.worker.tap",
    "Run a clusterd worker: connects to a server and runs sub-tasks in a process pool.",
    "clusterd-worker",
)
