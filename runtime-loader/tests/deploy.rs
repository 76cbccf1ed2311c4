//! The deployment files agree with the loader: the ClusterRole grants what the watchers and
//! the status writer use, the Role covers the identity ConfigMap, the DaemonSet passes flags
//! the binary has, and the Helm chart's RBAC is the plain manifests' with the namespace
//! templated. No API server is needed to catch a watcher the RBAC forgot.

use cnpc_runtime_loader::k8s;
use std::path::{Path, PathBuf};
use yaml_rust2::{Yaml, YamlLoader};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn docs(path: &str) -> Vec<Yaml> {
    let text = std::fs::read_to_string(root().join(path)).unwrap();
    YamlLoader::load_from_str(&text).unwrap()
}

fn strings(y: &Yaml) -> Vec<String> {
    y.as_vec()
        .map(|v| {
            v.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn of_kind<'a>(docs: &'a [Yaml], kind: &str) -> &'a Yaml {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind))
        .unwrap()
}

fn grants(role: &Yaml, group: &str, resource: &str, verb: &str) -> bool {
    role["rules"].as_vec().unwrap().iter().any(|r| {
        strings(&r["apiGroups"]).iter().any(|g| g == group)
            && strings(&r["resources"]).iter().any(|x| x == resource)
            && strings(&r["verbs"]).iter().any(|v| v == verb)
    })
}

#[test]
fn rbac_grants_every_watch_and_write_the_loader_makes() {
    let rbac = docs("deploy/kubernetes/rbac.yaml");
    let cluster_role = of_kind(&rbac, "ClusterRole");
    for kind in &k8s::KINDS {
        for verb in ["list", "watch"] {
            assert!(
                grants(cluster_role, kind.group, kind.plural, verb),
                "{verb} {} ({})",
                kind.plural,
                kind.group
            );
        }
        if kind.policy {
            let (resource, verb) = if kind.group == "cilium.io" {
                (format!("{}/status", kind.plural), "patch")
            } else {
                (kind.plural.to_string(), "patch")
            };
            assert!(
                grants(cluster_role, kind.group, &resource, verb),
                "{verb} {resource}"
            );
        }
    }
    let role = of_kind(&rbac, "Role");
    assert!(grants(role, "", "configmaps", "create"));
    let named = role["rules"].as_vec().unwrap().iter().any(|r| {
        strings(&r["resourceNames"]) == [k8s::IDENTITIES_CONFIGMAP]
            && strings(&r["verbs"]).contains(&"get".to_string())
            && strings(&r["verbs"]).contains(&"update".to_string())
    });
    assert!(named, "get and update on {}", k8s::IDENTITIES_CONFIGMAP);
}

#[test]
fn the_daemonset_runs_the_loader_with_flags_it_has() {
    let ds = &docs("deploy/kubernetes/daemonset.yaml")[0];
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"].as_bool(), Some(true));
    let c = &pod["containers"][0];
    let args = strings(&c["args"]);
    assert!(args.contains(&"--kubernetes".to_string()));
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_cnpc-loader"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in args.iter().filter(|a| a.starts_with("--")) {
        assert!(help.contains(flag.as_str()), "cnpc-loader has no {flag}");
    }
    let env: Vec<String> = c["env"]
        .as_vec()
        .unwrap()
        .iter()
        .filter_map(|e| e["name"].as_str().map(str::to_string))
        .collect();
    assert!(env.contains(&"NODE_NAME".into()) && env.contains(&"POD_NAMESPACE".into()));
    let bpffs = c["volumeMounts"]
        .as_vec()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"].as_str() == Some("/sys/fs/bpf"))
        .expect("bpffs mounted");
    assert_eq!(bpffs["mountPropagation"].as_str(), Some("Bidirectional"));
}

#[test]
fn the_helm_chart_rbac_is_the_manifests() {
    let plain = std::fs::read_to_string(root().join("deploy/kubernetes/rbac.yaml")).unwrap();
    let chart =
        std::fs::read_to_string(root().join("deploy/helm/cnpc/templates/rbac.yaml")).unwrap();
    let body = |t: &str| -> Vec<String> {
        t.lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| l.replace("{{ .Release.Namespace }}", "kube-system"))
            .collect()
    };
    assert_eq!(body(&chart), body(&plain));
}
