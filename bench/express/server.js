// The Express server a shop might write instead of ours: the polling benchmark's anchor.
//
// One Node process with cors() and express.json(), payments in an in-memory Map, answering
// POST /stkpush/status by the body's checkoutRequestId. The benchmark seeds the Map with our
// server's own answers, so both send the same JSON for the same payment:
//
//     node server.js PORT ANSWERS.json     (ANSWERS.json: {"<checkoutRequestId>": answer, ...})
//
// It listens on 127.0.0.1 only.
"use strict";

const fs = require("fs");
const cors = require("cors");
const express = require("express");

const [port, answersFile] = process.argv.slice(2);
const payments = new Map(Object.entries(JSON.parse(fs.readFileSync(answersFile, "utf8"))));

const app = express();
app.use(cors());
app.use(express.json());

app.post("/stkpush/status", (req, res) => {
  const payment = payments.get(req.body.checkoutRequestId);
  if (payment === undefined) {
    res.status(404).json({ success: false, error: "Transaction not found" });
    return;
  }
  res.json(payment);
});

app.get("/health", (req, res) => {
  res.json({ status: "ok" });
});

app.listen(Number(port), "127.0.0.1");
