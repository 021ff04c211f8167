//! Small HTTP servers and proxies that tests put between walcast and a
//! service to cut or slow it.

/// Serves `router` on a free loopback port for the rest of the test; returns
/// its URL. The failure-injecting proxies run on it.
pub async fn serve(router: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        axum::serve(listener, router).await.expect("serve");
    });
    url
}

/// What the failure-injecting proxies do with a request they let through:
/// sends it to `upstream` (same method, path, query and body, with
/// `headers`) and answers with upstream's status, body and content type.
pub async fn forward(
    http: &reqwest::Client,
    upstream: &str,
    method: &axum::http::Method,
    uri: &axum::http::Uri,
    headers: &[(&str, &str)],
    body: axum::body::Bytes,
) -> axum::response::Response {
    let url = format!(
        "{upstream}{}",
        uri.path_and_query().map(|x| x.as_str()).unwrap_or("/")
    );
    let mut req = http.request(
        reqwest::Method::from_bytes(method.as_str().as_bytes()).unwrap(),
        url,
    );
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let resp = req.body(body.to_vec()).send().await.unwrap();
    let status = axum::http::StatusCode::from_u16(resp.status().as_u16()).unwrap();
    let content_type = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_string();
    let bytes = resp.bytes().await.unwrap();
    axum::response::Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(axum::body::Body::from(bytes))
        .unwrap()
}
