// Upload one file with tus-js-client (Node), as the test that imports this asks; print JSON.
// argv: endpoint path parallelUploads project dataset kind
"use strict";
const fs = require("fs");
const path = require("path");
const tus = require("tus-js-client");

const [endpoint, file, parallel, project, dataset, kind] = process.argv.slice(2);
const data = fs.readFileSync(file);
const upload = new tus.Upload(data, {
  endpoint,
  parallelUploads: Number(parallel),
  chunkSize: 256 * 1024,
  retryDelays: [],
  metadata: { project, dataset, kind, filename: path.basename(file) },
  onError: (error) => {
    const status = error.originalResponse ? error.originalResponse.getStatus() : null;
    const body = error.originalResponse ? error.originalResponse.getBody() : null;
    console.log(JSON.stringify({ ok: false, status, body, message: String(error.message) }));
    process.exit(0);
  },
  onSuccess: () => {
    console.log(JSON.stringify({ ok: true, url: upload.url }));
    process.exit(0);
  },
});
upload.start();
