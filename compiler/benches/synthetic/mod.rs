//! The synthetic cluster and policy set of the compile benchmark (issue 3), shared with the
//! loader benchmark: workloads grouped into apps (one identity each) across namespaces, and
//! policies mixing L3, L4, port ranges, CIDR with excepts, FQDN with DNS rules, and deny rules.

use std::fmt::Write;

pub struct Shape {
    pub workloads: usize,
    pub identities: usize,
    pub policies: usize,
    pub namespaces: usize,
}

pub fn cluster_yaml(s: &Shape) -> String {
    let mut y = String::from("apiVersion: v1\nkind: List\nitems:\n");
    for n in 0..s.namespaces {
        let _ = writeln!(y, "- {{apiVersion: v1, kind: Namespace, metadata: {{name: ns{n}, labels: {{team: t{}}}}}}}", n % 7);
    }
    for w in 0..s.workloads {
        // Workloads with the same app share labels and namespace: one identity per app.
        let app = w % s.identities;
        let ns = app % s.namespaces;
        let _ = writeln!(
            y,
            "- {{apiVersion: v1, kind: Pod, metadata: {{name: w{w}, namespace: ns{ns}, labels: {{app: a{app}, tier: t{}}}}}, status: {{podIPs: [{{ip: 10.{}.{}.{}}}]}}}}",
            app % 3,
            w / 65536 % 256,
            w / 256 % 256,
            w % 256
        );
    }
    y
}

pub fn policies_yaml(s: &Shape) -> String {
    let mut y = String::new();
    for p in 0..s.policies {
        let app = p % s.identities;
        let ns = app % s.namespaces;
        let peer = (p * 7 + 3) % s.identities;
        let _ = write!(y, "---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: p{p}, namespace: ns{ns}}}\nspec:\n  endpointSelector: {{matchLabels: {{app: a{app}}}}}\n");
        match p % 5 {
            // L3/L4 from a peer app anywhere in the cluster.
            0 => {
                let _ = write!(y, "  ingress:\n  - fromEndpoints: [{{matchLabels: {{app: a{peer}, k8s:io.kubernetes.pod.namespace: ns{}}}}}]\n    toPorts: [{{ports: [{{port: \"{}\", protocol: TCP}}]}}]\n", peer % s.namespaces, 8000 + p % 100);
            }
            // L3 by tier within the namespace, and a port range.
            1 => {
                let _ = write!(y, "  ingress:\n  - fromEndpoints: [{{matchLabels: {{tier: t{}}}}}]\n    toPorts: [{{ports: [{{port: \"9000\", endPort: {}, protocol: ANY}}]}}]\n", p % 3, 9000 + p % 50);
            }
            // CIDR egress with an except.
            2 => {
                let _ = write!(y, "  egress:\n  - toCIDRSet: [{{cidr: {}.0.0.0/8, except: [{}.{}.0.0/16]}}]\n    toPorts: [{{ports: [{{port: \"443\", protocol: TCP}}]}}]\n", 20 + p % 50, 20 + p % 50, p % 200);
            }
            // FQDN egress with the DNS rule that makes it work.
            3 => {
                let _ = write!(y, "  egress:\n  - toFQDNs: [{{matchPattern: \"*.svc{}.example.com\"}}]\n    toPorts: [{{ports: [{{port: \"443\", protocol: TCP}}]}}]\n  - toEndpoints: [{{matchLabels: {{k8s:io.kubernetes.pod.namespace: ns0, app: a0}}}}]\n    toPorts:\n    - ports: [{{port: \"53\", protocol: ANY}}]\n      rules: {{dns: [{{matchPattern: \"*\"}}]}}\n", p % 300);
            }
            // Deny from a namespace team, beside an allow-all from the cluster.
            _ => {
                let _ = write!(y, "  ingressDeny:\n  - fromEndpoints: [{{matchLabels: {{io.cilium.k8s.namespace.labels.team: t{}}}}}]\n  ingress:\n  - fromEntities: [cluster]\n", p % 7);
            }
        }
    }
    y
}
