//! The compile benchmark's second, independent set (issue 3, item 4): 10,000 policies over
//! 5,000 pods whose egress rules reach large label groups on port ranges (`port` + `endPort`),
//! the shape that made per-(identity, port prefix) map images blow up. Declared only by the
//! compile benchmark (the loader benchmark includes `mod.rs`, not this file).
//!
//! Every pod has its own app (one identity each) and a `role` shared by the apps of one
//! namespace that policies select (so several identities share one table), a `group` (one of
//! [`EgressShape::groups`], across every namespace) and a `tier` (one of five); namespaces
//! carry a `team` and an `env`. Policy `p` selects role `p % roles`; by `p / roles % 7` it is
//! - 0: egress to a group in every namespace (a namespace-label selector: `env` exists) on a
//!   wide TCP range whose ends are off powers of two (about 16 aligned prefixes), and to a tier
//!   in one team's namespaces on the node-port range 30000-32767;
//! - 1-3: egress to a tier within the policy's namespace on a short UDP range;
//! - 4-6: ingress from the policy's namespace on one TCP port.

use std::fmt::Write;

pub struct EgressShape {
    pub pods: usize,
    pub policies: usize,
    pub namespaces: usize,
    /// Distinct apps, one identity each (pods beyond `apps` share their app's identity).
    pub apps: usize,
    /// Distinct subjects of policies (a multiple of `namespaces`, so that a role lives in one).
    pub roles: usize,
    pub groups: usize,
}

impl EgressShape {
    /// The set issue 3 item 4 describes: 10,000 policies over 5,000 pods.
    pub fn standard() -> EgressShape {
        EgressShape {
            pods: 5000,
            policies: 10_000,
            namespaces: 20,
            apps: 5000,
            roles: 700,
            groups: 8,
        }
    }
}

const TIERS: [&str; 5] = ["web", "api", "db", "cache", "queue"];

pub fn cluster_yaml(s: &EgressShape) -> String {
    let mut y = String::from("apiVersion: v1\nkind: List\nitems:\n");
    for n in 0..s.namespaces {
        let env = if n.is_multiple_of(2) {
            "prod"
        } else {
            "staging"
        };
        let _ = writeln!(
            y,
            "- {{apiVersion: v1, kind: Namespace, metadata: {{name: e{n}, labels: {{team: t{}, env: {env}}}}}}}",
            n % 4
        );
    }
    for w in 0..s.pods {
        let app = w % s.apps;
        let ns = app % s.namespaces;
        let _ = writeln!(
            y,
            "- {{apiVersion: v1, kind: Pod, metadata: {{name: p{w}, namespace: e{ns}, labels: {{app: a{app}, role: r{}, group: g{}, tier: {}}}}}, status: {{podIPs: [{{ip: 10.{}.{}.{}}}]}}}}",
            app % s.roles,
            app % s.groups,
            TIERS[app / s.groups % TIERS.len()],
            100 + w / 65536 % 100,
            w / 256 % 256,
            w % 256
        );
    }
    y
}

pub fn policies_yaml(s: &EgressShape) -> String {
    let mut y = String::new();
    for p in 0..s.policies {
        let (role, k) = (p % s.roles, p / s.roles);
        let ns = role % s.namespaces;
        let _ = write!(
            y,
            "---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: q{p}, namespace: e{ns}}}\nspec:\n  endpointSelector: {{matchLabels: {{role: r{role}}}}}\n"
        );
        match k % 7 {
            0 => {
                // Wide unaligned ranges, a few dozen distinct ones.
                let lo = 1025 + 7 * (p % 47);
                let hi = 9000 + 13 * (p % 37);
                let _ = write!(
                    y,
                    "  egress:\n  - toEndpoints: [{{matchLabels: {{group: g{}}}, matchExpressions: [{{key: io.cilium.k8s.namespace.labels.env, operator: Exists}}]}}]\n    toPorts: [{{ports: [{{port: \"{lo}\", endPort: {hi}, protocol: TCP}}]}}]\n  - toEndpoints: [{{matchLabels: {{io.cilium.k8s.namespace.labels.team: t{}, tier: {}}}}}]\n    toPorts: [{{ports: [{{port: \"30000\", endPort: 32767, protocol: TCP}}]}}]\n",
                    (role * 3 + k) % s.groups,
                    p % 4,
                    TIERS[p / 7 % TIERS.len()],
                );
            }
            1..=3 => {
                let lo = 5000 + 10 * (p % 13);
                let _ = write!(
                    y,
                    "  egress:\n  - toEndpoints: [{{matchLabels: {{tier: {}}}}}]\n    toPorts: [{{ports: [{{port: \"{lo}\", endPort: {}, protocol: UDP}}]}}]\n",
                    TIERS[(p * 3 + 2) % TIERS.len()],
                    lo + 37,
                );
            }
            _ => {
                let _ = write!(
                    y,
                    "  ingress:\n  - fromEndpoints: [{{}}]\n    toPorts: [{{ports: [{{port: \"{}\", protocol: TCP}}]}}]\n",
                    80 + p % 3
                );
            }
        }
    }
    y
}

/// Writes the set as files a user would have: `cluster.yaml` and `policies/` of 100 files of
/// 100 policies; returns (cluster file, policies directory).
pub fn write_set(
    s: &EgressShape,
    dir: &std::path::Path,
) -> std::io::Result<(std::path::PathBuf, std::path::PathBuf)> {
    let cluster = dir.join("cluster.yaml");
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies)?;
    std::fs::write(&cluster, cluster_yaml(s))?;
    let all = policies_yaml(s);
    let docs: Vec<&str> = all.split("---\n").filter(|d| !d.is_empty()).collect();
    for (i, chunk) in docs.chunks(100).enumerate() {
        let text: String = chunk.iter().map(|d| format!("---\n{d}")).collect();
        std::fs::write(policies.join(format!("q{i:03}.yaml")), text)?;
    }
    Ok((cluster, policies))
}
