// Validates the Prometheus Operator objects (ServiceMonitor,
// PrometheusRule) of the given YAML files against the operator's CRD
// schemas, which kubeconform's Kubernetes schemas do not include. The
// schemas come compiled in the npm package @kubernetes-models/prometheus-operator
// (generated from the operator's CRDs). deploy/ci/check-deploy installs it
// under target/tools/node and runs this file from there.
//
//   node validate-crds.mjs FILE...   (prints one line per object; exit 1 on any invalid)
import { readFileSync } from "node:fs";
import { parseAllDocuments } from "yaml";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";
import { PrometheusRule } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule";

const models = { "monitoring.coreos.com/v1/ServiceMonitor": ServiceMonitor, "monitoring.coreos.com/v1/PrometheusRule": PrometheusRule };
let bad = 0, checked = 0;
for (const file of process.argv.slice(2)) {
  for (const doc of parseAllDocuments(readFileSync(file, "utf8"))) {
    if (doc.errors.length) { console.log(`${file}: invalid YAML: ${doc.errors[0].message}`); bad++; continue; }
    const o = doc.toJS();
    if (!o || !o.kind) continue;
    const Model = models[`${o.apiVersion}/${o.kind}`];
    if (!Model) continue;
    checked++;
    try {
      new Model(o).validate();
      console.log(`${file} - ${o.kind} ${o.metadata?.name} is valid`);
    } catch (e) {
      bad++;
      console.log(`${file} - ${o.kind} ${o.metadata?.name} is INVALID: ${e.message}`);
    }
  }
}
console.log(`CRD objects: ${checked} checked, ${bad} invalid`);
process.exit(bad ? 1 : 0);
