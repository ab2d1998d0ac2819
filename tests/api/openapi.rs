//! `/openapi.json`: every route, every error code; `/docs` lists it.

use creditd::http::error::Code;
use serde_json::Value;

use crate::support::*;

async fn document(app: &TestApp) -> Value {
    let (status, document) =
        json_of(app.http.get(app.url("/openapi.json")).send().await.unwrap()).await;
    assert_eq!(status, 200);
    document
}

#[actix::test]
async fn the_openapi_document_describes_every_route_and_every_error_code() {
    let app = spawn_app().await;
    let document = document(&app).await;

    assert!(document["openapi"].as_str().unwrap().starts_with("3.1"));
    let paths = document["paths"].as_object().expect("paths");
    let mut operations = 0;
    for (path, item) in paths {
        for (method, operation) in item.as_object().unwrap() {
            operations += 1;
            // The router knows it: the fallback 404 is "no such route".
            let concrete = path
                .replace("{userId}", "user_doc")
                .replace("{provider}", "openai");
            let request = app
                .http
                .request(method.to_uppercase().parse().unwrap(), app.url(&concrete))
                .bearer_auth(ADMIN_TOKEN);
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let body = response.text().await.unwrap();
            assert!(
                !(status == 404 && body.contains("no such route")),
                "{method} {path} is documented but not served"
            );
            let responses = operation["responses"].as_object().unwrap();
            let documented_errors = responses
                .iter()
                .filter(|(status, _)| !status.starts_with('2'))
                .count();
            if !["/openapi.json", "/docs"].contains(&path.as_str()) {
                assert!(documented_errors > 0, "{method} {path} documents no error");
            }
        }
    }
    assert!(operations >= 19, "{operations}");
    for (method, path) in [
        ("get", "/api/credits"),
        ("post", "/api/credits/topup"),
        ("post", "/api/chat"),
        ("post", "/api/webhooks/stripe"),
        ("post", "/api/webhooks/clerk"),
        ("put", "/api/settings/api-keys"),
        ("post", "/admin/accounts/{userId}/credits"),
        ("get", "/metrics"),
    ] {
        assert!(paths[path][method].is_object(), "{method} {path} missing");
    }
    let codes: Vec<&str> = document["components"]["schemas"]["ErrorCode"]["enum"]
        .as_array()
        .expect("the error codes")
        .iter()
        .map(|code| code.as_str().unwrap())
        .collect();
    for code in Code::ALL {
        assert!(
            codes.contains(&code.as_str()),
            "{} undocumented",
            code.as_str()
        );
    }
    let text = document.to_string();
    // Every reference resolves; every link names an operation that exists.
    let mut operation_ids = Vec::new();
    for item in paths.values() {
        for operation in item.as_object().unwrap().values() {
            operation_ids.extend(operation["operationId"].as_str());
        }
    }
    for reference in text.split("\"$ref\":\"").skip(1) {
        let target = reference.split('"').next().unwrap();
        let pointer = target.trim_start_matches('#');
        assert!(
            document.pointer(pointer).is_some(),
            "{target} does not resolve"
        );
    }
    let mut links = 0;
    for item in paths.values() {
        for operation in item.as_object().unwrap().values() {
            for response in operation["responses"].as_object().unwrap().values() {
                for link in response["links"]
                    .as_object()
                    .into_iter()
                    .flat_map(|l| l.values())
                {
                    links += 1;
                    let target = link["operationId"].as_str().expect("operationId");
                    assert!(operation_ids.contains(&target), "link to {target}");
                }
            }
        }
    }
    assert!(links >= 3, "{links} links");
    for code in [
        "ACCOUNT_DELETED",
        "RATE_LIMITED",
        "INSUFFICIENT_CREDITS",
        "REQUEST_TIMEOUT",
    ] {
        assert!(text.contains(code));
    }
}

#[actix::test]
async fn the_docs_page_is_served_from_the_binary() {
    let app = spawn_app().await;
    let response = app.http.get(app.url("/docs")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/html")));
    assert!(response.text().await.unwrap().contains("/openapi.json"));
}

#[actix::test]
async fn the_openapi_document_describes_the_outgoing_event_a_receiver_gets_with_its_sequence() {
    let app = spawn_app().await;
    let document = document(&app).await;

    let webhook = &document["webhooks"]["outgoingEvent"]["post"];
    assert_eq!(
        webhook["requestBody"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/EventEnvelope",
        "{webhook}"
    );
    assert_eq!(webhook["parameters"][0]["name"], "Creditd-Signature");
    let envelope = &document["components"]["schemas"]["EventEnvelope"];
    let required: Vec<&str> = envelope["required"]
        .as_array()
        .expect("required fields")
        .iter()
        .filter_map(|field| field.as_str())
        .collect();
    for field in ["id", "type", "createdAt", "sequence", "data"] {
        assert!(required.contains(&field), "{field}: {envelope}");
    }
    assert!(envelope["properties"]["sequence"]["description"]
        .as_str()
        .is_some_and(|text| text.contains("gap")));
    let listed = &document["components"]["schemas"]["EventDelivery"]["properties"];
    assert!(listed["sequence"].is_object(), "{listed}");
}
