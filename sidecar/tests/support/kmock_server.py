#!/usr/bin/env python3
"""Starts kmock (a stateful Kubernetes API emulator from PyPI) for the isolator tests.

Usage: kmock_server.py [--nodes N] [--pods-namespace NS] [--owner-job NAME]

Listens on 127.0.0.1 on a free port, pre-loads N nodes `node-0` .. `node-<N-1>` and, for each,
one pod `train-<i>` in the namespace given (scheduled on that node), prints one line
`KMOCK_URL=http://127.0.0.1:<port>` and serves until its standard input reaches end of file, so it
never outlives the test process that started it (that process holds the pipe).

With --owner-job NAME it also pre-loads a batch/v1 Job NAME (uid `uid-job-NAME`) in that namespace
and makes it the controller owner of every pod, as the Job controller would.
"""

import argparse
import asyncio
import sys

import kmock


def node(name: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "spec": {},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]},
    }


def pod(name: str, namespace: str, node_name: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}"},
        "spec": {"nodeName": node_name, "containers": [{"name": "trainer", "image": "trainer"}]},
    }


def job(name: str, namespace: str) -> dict:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": namespace, "uid": f"uid-job-{name}"},
        "spec": {"template": {"spec": {"containers": [{"name": "trainer", "image": "trainer"}]}}},
    }


def owned_by(obj: dict, owner: dict) -> dict:
    obj["metadata"]["ownerReferences"] = [
        {
            "apiVersion": owner["apiVersion"],
            "kind": owner["kind"],
            "name": owner["metadata"]["name"],
            "uid": owner["metadata"]["uid"],
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    return obj


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--pods-namespace", default="train")
    parser.add_argument("--owner-job", default=None)
    args = parser.parse_args()

    async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator) as server:
        owner = None
        if args.owner_job:
            owner = job(args.owner_job, args.pods_namespace)
            emulator.objects["batch/v1/jobs", args.pods_namespace, args.owner_job] = owner
        for i in range(args.nodes):
            emulator.objects["v1/nodes", None, f"node-{i}"] = node(f"node-{i}")
            name = f"train-{i}"
            p = pod(name, args.pods_namespace, f"node-{i}")
            if owner is not None:
                p = owned_by(p, owner)
            emulator.objects["v1/pods", args.pods_namespace, name] = p
        print(f"KMOCK_URL={str(server.url).rstrip('/')}", flush=True)
        loop = asyncio.get_running_loop()
        # Blocks a worker thread until the parent closes our stdin (or dies).
        await loop.run_in_executor(None, sys.stdin.read)


if __name__ == "__main__":
    asyncio.run(main())
