"""Drive the deadline saga's example services over HTTP, as a user would with curl, and check
that each scenario ends as SPEC B7 says. Exits non-zero if one does not."""

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

base = sys.argv[1]
runtime_pid = int(sys.argv[2])


def call(method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def show(method, path, body=None):
    shown = f" -d '{json.dumps(body)}'" if body is not None else ""
    status, reply = call(method, path, body)
    print(f"$ curl -X {method} {base}{path}{shown}\n  {status} {json.dumps(reply)}")
    return reply


def wait_ready():
    for _ in range(600):
        try:
            os.kill(runtime_pid, 0)
        except OSError:
            sys.exit("the runtime exited during start-up; see its log")
        try:
            # Ready: database answering, partitions assigned, relay slot known.
            with urllib.request.urlopen(base + "/readyz", timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    sys.exit("the runtime did not become ready in 60 s")


def settle(order_id, path="/orders"):
    started = time.monotonic()
    while time.monotonic() - started < 30:
        _, order = call("GET", f"{path}/{order_id}")
        if order.get("status") != "PENDING":
            return order, time.monotonic() - started
        time.sleep(0.02)
    sys.exit(f"order {order_id} still PENDING after 30 s")


def order_for(user, amount):
    """Give `user` 10000 points, order `amount`, wait for the saga to settle; show each step."""
    show("POST", "/points", {"userId": user, "point": 10000})
    order = show("POST", "/orders", {"holderId": user, "currencyId": 1, "amount": amount})
    order, took = settle(order["id"])
    print(f"  (settled in {took * 1000:.0f} ms)")
    show("GET", f"/orders/{order['id']}")
    return order, show("GET", f"/points/{user}")


def check(what, ok):
    print(f"  {'ok' if ok else 'WRONG'}: {what}")
    return ok


wait_ready()
good = True

print("\n== B7.1 happy path: 10000 points, order 500 ==")
order, points = order_for("alice", 500)
exchanges = show("GET", "/exchanges")
good &= check("order APPROVED", order["status"] == "APPROVED")
good &= check("points 9500", points["point"] == 9500)
good &= check("one exchange", len([e for e in exchanges if e["holderId"] == "alice"]) == 1)

print("\n== B7.2 point limit: 10000 points, order 50000 ==")
order, points = order_for("bob", 50000)
good &= check("order REJECTED for the point limit",
              order["status"] == "REJECTED" and "point limit" in (order["reason"] or ""))
good &= check("points unchanged at 10000", points["point"] == 10000)
for _ in range(500):
    _, exchanges = call("GET", "/exchanges")
    if not [e for e in exchanges if e["holderId"] == "bob"]:
        break
    time.sleep(0.02)
show("GET", "/exchanges")
good &= check("bob's exchange compensated", not [e for e in exchanges if e["holderId"] == "bob"])



def eventually(probe, seconds=30):
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        value = probe()
        if value:
            return value
        time.sleep(0.02)
    return None


def shop_order(customer, product, quantity, amount):
    """Place an order with the outbox saga's shop and wait for it to settle; show each step."""
    order = show("POST", "/shop/orders",
                 {"customerId": customer, "productId": product, "quantity": quantity, "amount": amount})
    order, took = settle(order["id"], "/shop/orders")
    print(f"  (settled in {took * 1000:.0f} ms)")
    return show("GET", f"/shop/orders/{order['id']}")


print("\n== A: outbox saga, order → payment + stock, all succeed ==")
show("POST", "/accounts", {"accountId": "carol", "balance": 1000})
show("POST", "/stock", {"productId": "kettle", "available": 10})
order = shop_order("carol", "kettle", 2, 300)
good &= check("order SUCCESS", order["status"] == "SUCCESS")
good &= check("balance 700", show("GET", "/accounts/carol")["balance"] == 700)
good &= check("stock 8", show("GET", "/stock/kettle")["available"] == 8)

print("\n== A9: payment fails (balance 100, order 300), stock succeeded → compensate stock ==")
show("POST", "/accounts", {"accountId": "dave", "balance": 100})
order = shop_order("dave", "kettle", 1, 300)
good &= check("order FAILED for the payment", order["status"] == "FAILED"
              and (order["reason"] or "").startswith("payment failed"))
good &= check("dave's reservation COMPENSATED", bool(eventually(
    lambda: [r for r in call("GET", "/reservations")[1]
             if r["orderId"] == order["id"] and r["status"] == "COMPENSATED"])))
good &= check("stock back to 8", show("GET", "/stock/kettle")["available"] == 8)
good &= check("balance unchanged at 100", show("GET", "/accounts/dave")["balance"] == 100)
print(f"  see the timeline: runtime trace {order['id']} --runtime {base}")
print(f"  and the dead letter: runtime dlt list payment --brokers <broker>")

def runtime(*args):
    """Run the runtime CLI against this runtime, show it as typed and what it printed."""
    cmd = [os.environ["SAGA_DEMO_BIN"], *args, "--runtime", base]
    print("$ runtime " + " ".join(args))
    done = subprocess.run(cmd, capture_output=True, text=True,
                          env={**os.environ, "RUST_BACKTRACE": "0"})
    for line in (done.stdout + done.stderr).strip().splitlines():
        print("  " + line)
    return done.returncode


print("\n== C3/C4: deploy point 0.2.0 while the runtime runs, guarded by --verify ==")
v2 = os.path.join(os.environ["SAGA_DEMO_GUESTS"], "point_v2.wasm")
good &= check("--verify finds what 0.2.0 does differently and does not deploy",
              runtime("deploy", "--verify", "--replace", v2) != 0)
good &= check("deployed", runtime("deploy", "--replace", v2) == 0)
show("POST", "/orders", {"holderId": "alice", "currencyId": 1, "amount": 100})
stamped = eventually(lambda: [t for t in call("GET", "/transactions")[1]
                              if t.get("handledBy") == "point 0.2.0"])
good &= check("the next saga ran on point 0.2.0", bool(stamped))
good &= check("rolled back to 0.1.0", runtime("rollback", "point") == 0)
runtime("versions", "point")

print("\nall scenarios ended as SPEC A, B7 and C4 say" if good else "\nSOME SCENARIO ENDED WRONG")
sys.exit(0 if good else 1)
