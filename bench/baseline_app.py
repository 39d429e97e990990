"""The ingest baseline: the least a Flask route can do for direction A, parse
the JSON body and answer success. Served with the service's own gunicorn
process settings (bench/baseline_gunicorn.py), so the ratio shows what the
service's own work (auth, validation, mapping, the durable commit) costs."""

from flask import Flask, jsonify, request

app = Flask(__name__)


@app.post("/v1/<kind>")
def ingest(kind: str):
    request.get_json(force=True)
    return jsonify(success=True)
