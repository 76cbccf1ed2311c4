//! Kubernetes mode without an API server: the reconcile core on objects, and the watchers and
//! the identity ConfigMap against kube's client over a mocked service (tower-test), which
//! plays the API server request by request.

use cnpc_ir::{Direction, Protocol, TableVerdict};
use cnpc_runtime_loader::generation::{CompileError, Generation};
use cnpc_runtime_loader::k8s::{self, Change, Objects, Store};
use http::{Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{json, Value};
use std::time::Duration;

fn pod(name: &str, labels: Value, ip: &str) -> Value {
    json!({"metadata": {"name": name, "namespace": "default", "labels": labels},
           "spec": {"containers": [{"name": "c"}]},
           "status": {"podIPs": [{"ip": ip}]}})
}

fn rule1(port: &str) -> Value {
    json!({"metadata": {"name": "rule1", "namespace": "default"},
           "spec": {"endpointSelector": {"matchLabels": {"org": "empire", "class": "deathstar"}},
                    "ingress": [{"fromEndpoints": [{"matchLabels": {"org": "empire"}}],
                                 "toPorts": [{"ports": [{"port": port, "protocol": "TCP"}]}]}]}})
}

fn cluster_objects() -> Vec<(&'static str, Value)> {
    vec![
        ("Namespace", json!({"metadata": {"name": "default"}})),
        (
            "Pod",
            pod(
                "deathstar",
                json!({"org": "empire", "class": "deathstar"}),
                "10.0.1.10",
            ),
        ),
        (
            "Pod",
            pod(
                "tiefighter",
                json!({"org": "empire", "class": "tiefighter"}),
                "10.0.1.20",
            ),
        ),
        (
            "Pod",
            pod(
                "xwing",
                json!({"org": "alliance", "class": "xwing"}),
                "10.0.1.30",
            ),
        ),
    ]
}

fn objects(policy: Value) -> Objects {
    let mut store = Store::default();
    for (kind, o) in cluster_objects()
        .into_iter()
        .chain([("CiliumNetworkPolicy", policy)])
    {
        let kind = k8s::KINDS.iter().find(|k| k.kind == kind).unwrap().kind;
        store.change(Change::Apply(kind, o));
    }
    store.objects
}

fn identity(g: &Generation, name: &str) -> cnpc_ir::NumericIdentity {
    g.endpoints
        .iter()
        .find(|e| e.name == name)
        .unwrap()
        .identity
}

fn verdict(g: &Generation, from: &str, port: u16) -> TableVerdict {
    let ds = identity(g, "default/deathstar");
    g.tables
        .iter()
        .find(|t| t.subject == ds && t.direction == Direction::Ingress)
        .unwrap()
        .lookup(identity(g, from), Protocol::Tcp, port)
        .clone()
}

#[test]
fn the_reconcile_core_compiles_objects_as_it_compiles_files() {
    let g = k8s::desired(&objects(rule1("80")), &Default::default(), None, None).unwrap();
    assert_eq!(verdict(&g, "default/tiefighter", 80), TableVerdict::Allow);
    assert_eq!(verdict(&g, "default/xwing", 80), TableVerdict::Deny);
    assert_eq!(verdict(&g, "default/tiefighter", 81), TableVerdict::Deny);
    // Pure: the same objects give the same generation.
    let again = k8s::desired(&objects(rule1("80")), &Default::default(), None, None).unwrap();
    assert_eq!(g.tables, again.tables);
    assert_eq!(g.allocation, again.allocation);
    // The annotation that names a pod's host-side interface reaches the loader.
    let mut objs = objects(rule1("80"));
    objs.by_kind
        .get_mut("Pod")
        .unwrap()
        .get_mut("default/xwing")
        .unwrap()["metadata"]["annotations"] = json!({"cnpc.io/interface": "lxc-xwing"});
    let g = k8s::desired(&objs, &Default::default(), None, None).unwrap();
    let xwing = g
        .endpoints
        .iter()
        .find(|e| e.name == "default/xwing")
        .unwrap();
    assert_eq!(xwing.interface.as_deref(), Some("lxc-xwing"));
}

#[test]
fn a_broken_object_is_named_in_its_status_and_the_others_wait() {
    let mut objs = objects(rule1("80"));
    let mut bad = rule1("80");
    bad["metadata"]["name"] = json!("rule2");
    bad["spec"]["ingress"][0]["toPorts"][0]["ports"][0]["protocol"] = json!("TPC");
    objs.by_kind
        .get_mut("CiliumNetworkPolicy")
        .unwrap()
        .insert("default/rule2".into(), bad);
    let result = k8s::desired(&objs, &Default::default(), None, None);
    let Err(CompileError::Invalid { by_file, .. }) = &result else {
        panic!("the protocol is invalid");
    };
    assert!(
        by_file.contains_key("CiliumNetworkPolicy/default/rule2"),
        "{by_file:?}"
    );
    let statuses = k8s::statuses(&objs, &result);
    let of = |key: &str| statuses.iter().find(|s| s.1 == key).unwrap();
    assert!(!of("default/rule2").2);
    assert!(
        of("default/rule2").3.contains("TPC"),
        "{:?}",
        of("default/rule2")
    );
    assert!(
        !of("default/rule1").2,
        "not enforced while another policy has errors"
    );
    let ok = k8s::statuses(
        &objects(rule1("80")),
        &k8s::desired(&objects(rule1("80")), &Default::default(), None, None),
    );
    assert!(ok.iter().all(|s| s.2));
}

#[test]
fn a_relist_replaces_a_kind_only_when_complete() {
    let mut store = Store::default();
    store.change(Change::Apply("Pod", pod("a", json!({}), "10.0.0.1")));
    store.change(Change::Relist("Pod"));
    store.change(Change::Apply("Pod", pod("b", json!({}), "10.0.0.2")));
    assert!(
        store.objects.by_kind["Pod"].contains_key("default/a"),
        "until the list completes"
    );
    store.change(Change::Synced("Pod"));
    let pods: Vec<&String> = store.objects.by_kind["Pod"].keys().collect();
    assert_eq!(pods, ["default/b"]);
    store.change(Change::Delete("Pod", pod("b", json!({}), "10.0.0.2")));
    assert!(store.objects.by_kind["Pod"].is_empty());
    assert!(!store.synced(), "other kinds are not listed yet");
}

fn respond(status: StatusCode, body: Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(&body).unwrap()))
        .unwrap()
}

fn conflict() -> Response<Body> {
    respond(
        StatusCode::CONFLICT,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict",
               "message": "the object has been modified", "code": 409}),
    )
}

fn configmap(rv: &str, allocation: &Value) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap",
           "metadata": {"name": "cnpc-identities", "namespace": "kube-system", "resourceVersion": rv},
           "data": {"allocation.json": allocation.to_string()}})
}

#[tokio::test]
async fn identities_are_committed_with_optimistic_concurrency() {
    let objs = objects(rule1("80"));
    // The label set of the tiefighter, as allocations key it.
    let first = k8s::desired(&objs, &Default::default(), None, None).unwrap();
    let tf = identity(&first, "default/tiefighter");
    let key = first
        .allocation
        .iter()
        .find(|(_, n)| **n == tf.0)
        .map(|(k, _)| k.clone())
        .unwrap();
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let server_key = key.clone();
    let server = tokio::spawn(async move {
        let key = server_key;
        let mut seen = Vec::new();
        let path = "/api/v1/namespaces/kube-system/configmaps/cnpc-identities";
        // Read, write (someone else wrote first: 409), read again (their number for the
        // tiefighter), write.
        let answers = [
            respond(StatusCode::OK, configmap("1", &json!({}))),
            conflict(),
            respond(
                StatusCode::OK,
                configmap("2", &json!({ key.clone(): 7777 })),
            ),
            respond(
                StatusCode::OK,
                configmap("3", &json!({ key.clone(): 7777 })),
            ),
        ];
        for answer in answers {
            let (req, send) = tokio::time::timeout(Duration::from_secs(10), handle.next_request())
                .await
                .expect("a request in time")
                .expect("a request");
            assert!(req.uri().path().starts_with(path), "{}", req.uri());
            seen.push(req.method().to_string());
            send.send_response(answer);
        }
        seen
    });
    let g = k8s::agree(client, "kube-system", |previous| {
        k8s::desired(&objs, previous, None, None)
    })
    .await
    .unwrap();
    let seen = server.await.unwrap();
    assert_eq!(seen, ["GET", "PUT", "GET", "PUT"]);
    assert_eq!(
        identity(&g, "default/tiefighter").0,
        7777,
        "the number committed by the other node"
    );
    assert_eq!(g.allocation[&key], 7777);
}

#[tokio::test]
async fn watchers_list_every_kind_and_follow_changes() {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(k8s::watch(client, tx));
    let list = |kind: &str, items: Vec<Value>| {
        respond(
            StatusCode::OK,
            json!({"apiVersion": "v1", "kind": format!("{kind}List"), "metadata": {"resourceVersion": "5"}, "items": items}),
        )
    };
    let server = tokio::spawn(async move {
        // Watches are held open (never answered) so the lists stand, but for one on Pods that
        // reports a new pod.
        let mut open = Vec::new();
        let mut told = false;
        loop {
            let Ok(Some((req, send))) =
                tokio::time::timeout(Duration::from_secs(5), handle.next_request()).await
            else {
                break;
            };
            let uri = req.uri().to_string();
            if uri.contains("watch=true") {
                if req.uri().path().ends_with("/pods") && !told {
                    told = true;
                    let event = json!({"type": "ADDED", "object": {"apiVersion": "v1", "kind": "Pod",
                        "metadata": {"name": "shuttle", "namespace": "default", "resourceVersion": "6",
                                     "labels": {"org": "empire", "class": "shuttle"}},
                        "status": {"podIPs": [{"ip": "10.0.1.50"}]}}});
                    send.send_response(
                        Response::builder()
                            .status(StatusCode::OK)
                            .body(Body::from(format!("{event}\n").into_bytes()))
                            .unwrap(),
                    );
                } else {
                    open.push(send);
                }
                continue;
            }
            let path = req.uri().path();
            let of = |kind: &str| {
                cluster_objects()
                    .into_iter()
                    .filter(|(k, _)| *k == kind)
                    .map(|(_, o)| o)
                    .collect::<Vec<_>>()
            };
            let answer = if path.ends_with("/ciliumnetworkpolicies") {
                list("CiliumNetworkPolicy", vec![rule1("80")])
            } else if path.ends_with("/ciliumclusterwidenetworkpolicies") {
                // A CRD that is not installed.
                respond(
                    StatusCode::NOT_FOUND,
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"}),
                )
            } else if path.ends_with("/pods") {
                list("Pod", of("Pod"))
            } else if path.ends_with("/namespaces") {
                list("Namespace", of("Namespace"))
            } else {
                list("Object", Vec::new())
            };
            send.send_response(answer);
        }
    });
    let mut store = Store::default();
    let synced = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(c) = rx.recv().await {
            store.change(c);
            if store.synced() {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(
        synced,
        Ok(true),
        "every kind listed (a missing CRD counts as empty)"
    );
    let followed = tokio::time::timeout(Duration::from_secs(20), async {
        while !store.objects.by_kind["Pod"].contains_key("default/shuttle") {
            match rx.recv().await {
                Some(c) => store.change(c),
                None => return false,
            }
        }
        true
    })
    .await;
    assert_eq!(followed, Ok(true), "the watch event reached the store");
    let g = k8s::desired(&store.objects, &Default::default(), None, None).unwrap();
    assert_eq!(verdict(&g, "default/tiefighter", 80), TableVerdict::Allow);
    assert_eq!(verdict(&g, "default/xwing", 80), TableVerdict::Deny);
    assert_eq!(
        verdict(&g, "default/shuttle", 80),
        TableVerdict::Allow,
        "an empire ship that arrived by watch"
    );
    server.abort();
}

#[tokio::test]
async fn status_is_written_once_per_change_where_kubectl_shows_it() {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let statuses = vec![
        (
            "CiliumNetworkPolicy",
            "default/rule1".to_string(),
            true,
            "compiled and enforced".to_string(),
        ),
        (
            "NetworkPolicy",
            "default/np".to_string(),
            false,
            "bad port".to_string(),
        ),
    ];
    let server = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Ok(Some((req, send))) =
            tokio::time::timeout(Duration::from_millis(500), handle.next_request()).await
        {
            seen.push(format!("{} {}", req.method(), req.uri().path()));
            send.send_response(respond(
                StatusCode::OK,
                json!({"apiVersion": "v1", "kind": "Object", "metadata": {"name": "x"}}),
            ));
        }
        seen
    });
    let mut written = Default::default();
    k8s::write_statuses(client.clone(), "node-1", &statuses, &mut written).await;
    // Unchanged: nothing more is written.
    k8s::write_statuses(client, "node-1", &statuses, &mut written).await;
    let seen = server.await.unwrap();
    assert_eq!(
        seen,
        [
            "PATCH /apis/cilium.io/v2/namespaces/default/ciliumnetworkpolicies/rule1/status",
            "PATCH /apis/networking.k8s.io/v1/namespaces/default/networkpolicies/np",
        ]
    );
}
