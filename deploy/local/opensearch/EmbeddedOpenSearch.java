// Embedded single-node OpenSearch 2.19.x for walcast's local test stack
// (route A in deploy/local/stack). Started by `deploy/local/stack`, which
// compiles this file with javac against the jars it resolved from Maven
// Central (org.opensearch:opensearch, opensearch-plugin-classloader,
// org.opensearch.plugin:transport-netty4-client, log4j-core).
//
// Why this works as root and without a distribution: the security manager,
// bootstrap checks and the refuse-to-run-as-root check all live in
// org.opensearch.bootstrap.Bootstrap, which this launcher never calls. The
// node gets exactly one classpath plugin (Netty4Plugin, the HTTP and
// transport layer); path.home's modules/ and plugins/ stay empty, so no
// painless, no ingest-common, no analysis-common, no reindex. Core + netty
// serve everything walcast's sink needs: _bulk with version_type=external,
// GET _doc, _refresh, _search, _count, mappings.
//
// Usage: java -cp CLASSES:LIBS/* EmbeddedOpenSearch HOME HTTP_PORT TRANSPORT_PORT
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.util.List;
import java.util.Map;
import java.util.concurrent.CountDownLatch;
import org.opensearch.cluster.service.ClusterService;
import org.opensearch.common.settings.Settings;
import org.opensearch.env.Environment;
import org.opensearch.node.InternalSettingsPreparer;
import org.opensearch.node.Node;
import org.opensearch.plugins.Plugin;
import org.opensearch.transport.Netty4Plugin;

public final class EmbeddedOpenSearch {
    static final class EmbeddedNode extends Node {
        EmbeddedNode(Environment env) {
            super(env, List.<Class<? extends Plugin>>of(Netty4Plugin.class), true);
        }

        // The stock implementation wires node/cluster ids into the logging
        // context set up by LogConfigurator, which we do not use.
        @Override
        protected void configureNodeAndClusterIdStateListener(ClusterService clusterService) {}
    }

    public static void main(String[] args) throws Exception {
        if (args.length != 3) {
            System.err.println("usage: EmbeddedOpenSearch HOME HTTP_PORT TRANSPORT_PORT");
            System.exit(2);
        }
        Path home = Paths.get(args[0]).toAbsolutePath();
        String httpPort = args[1];
        String transportPort = args[2];
        for (String sub : new String[] {"modules", "plugins", "config", "data", "logs"}) {
            Files.createDirectories(home.resolve(sub));
        }
        Settings settings = Settings.builder()
            .put("path.home", home.toString())
            .put("path.data", home.resolve("data").toString())
            .put("path.logs", home.resolve("logs").toString())
            .put("cluster.name", "walcast-test")
            .put("node.name", "node-1")
            .put("discovery.type", "single-node")
            .put("network.host", "127.0.0.1")
            .put("http.port", httpPort)
            .put("transport.port", transportPort)
            .put("cluster.routing.allocation.disk.threshold_enabled", false)
            .put("indices.breaker.total.use_real_memory", false)
            .put("action.auto_create_index", true)
            .build();
        Environment env = InternalSettingsPreparer.prepareEnvironment(settings, Map.of(), null, () -> "node-1");
        Node node = new EmbeddedNode(env);
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            try {
                node.close();
            } catch (Exception e) {
                e.printStackTrace();
            }
        }, "walcast-opensearch-shutdown"));
        try {
            node.start();
        } catch (Throwable t) {
            t.printStackTrace();
            System.exit(1);
        }
        System.out.println("walcast embedded OpenSearch started on http://127.0.0.1:" + httpPort);
        System.out.flush();
        // Node threads are daemons: keep the JVM alive until SIGTERM.
        new CountDownLatch(1).await();
    }
}
